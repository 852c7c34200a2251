"""e2e_search/record"""
