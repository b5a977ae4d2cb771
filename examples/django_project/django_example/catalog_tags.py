"""Template tags: a line's related objects, through the request's loaders.

Registered in ``settings.TEMPLATES`` under ``libraries`` as ``catalog``:
a template says ``{% load catalog %}``, then
``{% product line.product_id as p %}``.
"""

from __future__ import annotations

from django import template

from .catalog import Product, Supplier, load_products, load_suppliers

register = template.Library()


@register.simple_tag
def product(product_id: int) -> Product:
    """The product: from the store if the view (or an earlier tag) loaded it."""
    return load_products.load(product_id)


@register.simple_tag
def supplier(supplier_id: int) -> Supplier:
    return load_suppliers.load(supplier_id)
