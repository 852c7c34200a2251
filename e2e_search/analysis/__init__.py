"""e2e_search/analysis"""
