"""e2e_search/data"""
