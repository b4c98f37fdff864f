"""Loaded first by every Python process of the real-path rehearsal (tests/test_real_path.py
puts this folder on PYTHONPATH). It points torchvision's VOC and SBD download addresses at the
test's loopback server, and refuses every other download, so a command that would reach the
internet fails at once instead of hanging. Outside the rehearsal (no KD_REHEARSAL) it does
nothing.
"""
import json
import os

_URLS = os.environ.get("KD_REHEARSAL")

if _URLS:
    import urllib.error

    import torch.hub
    import torchvision.datasets.sbd as _sbd
    import torchvision.datasets.voc as _voc

    _urls = json.loads(_URLS)
    _voc.DATASET_YEAR_DICT["2012"].update(url=_urls["voc"], md5=_urls["voc_md5"])
    _sbd.SBDataset.url, _sbd.SBDataset.md5 = _urls["sbd"], _urls["sbd_md5"]
    _sbd.SBDataset.voc_train_url = _urls["sbd_split"]
    _sbd.SBDataset.voc_split_md5 = _urls["sbd_split_md5"]

    def _offline(url, *args, **kwargs):
        # pretrained weights must come from the stand-ins in $TORCH_HOME/hub/checkpoints
        raise urllib.error.URLError(f"the rehearsal is offline; {url} is not in the hub cache")

    torch.hub.download_url_to_file = _offline
