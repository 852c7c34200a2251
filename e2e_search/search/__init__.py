"""e2e_search/search"""
