"""e2e_search/export"""
