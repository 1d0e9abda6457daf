"""The embedded toy dataset: procedural captioned RGB images that need no download.

- :mod:`rapm.toy.scene`: attributes, scene sampling (per-image seeds), captions and their parser.
- :mod:`rapm.toy.render`: anti-aliased renderer (``render``, ``render_batch``, ``save_grid``).
- :mod:`rapm.toy.reader`: recovers a scene from an image; scores images against captions.
- :mod:`rapm.toy.captions`: ``captions_{train,val}2014.json`` in the COCO captions schema.
"""
