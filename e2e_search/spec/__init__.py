"""e2e_search/spec"""
