"""Model families (one module each) and the training functions Ray runs.

Every module here is imported by :func:`e2e_search.registry.get_family`, so a
new family is one new file with one ``@register_family`` call.
"""
