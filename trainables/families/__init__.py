"""Model families, one module each. Every module here is imported by
:func:`trainables.registry.get_family`, so a new family is one new file with one ``@register_family`` call
(see the README's "Adding a model family"). This package imports nothing itself."""
