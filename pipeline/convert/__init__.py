"""`byol convert`: an ImageFolder tree (or a file list) -> each backend's format, by the backend's own `Writer`.

`dataset.py` lists, checks and normalises the images and hands them to the writers, `normalise.py` brings one image
to what every loader decodes, `report.py` is the `convert_report.json` it leaves. It reaches the formats only through
`pipeline.registry.BACKENDS`; the backends never import it (what both need lies below: `storage`, `rgb`, `folder`).
"""
from __future__ import annotations

from byolfast.pipeline.convert.dataset import convert_dataset, list_samples
from byolfast.pipeline.convert.report import ConvertReport

__all__ = ["ConvertReport", "convert_dataset", "list_samples"]
