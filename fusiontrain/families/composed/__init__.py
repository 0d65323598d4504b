"""A composed model: any registered decoder family with any registered encoder family, joined by new
cross-attention layers: fusion slots and fresh initialisation (``compose``) and the family
(``family``)."""
