"""Training: from labelled images to a model file. :mod:`.annotations` reads annotations (GeoJSON, ASAP XML, label
masks) into label rasters, with :mod:`.classmap` (class names -> values) and :mod:`.vectors` (ASAP XML, cleaning,
rasterisation); :mod:`.pairs` pairs images with annotations (folders, CSVs, splits, fingerprints) and
:mod:`.dataset` cuts them into fixed-size regions; :mod:`.mosaic` builds labelled texture mosaics from unpaired
label maps (:mod:`.mosaic_draw` draws each one); :mod:`.loop` trains the deformation and segmentation nets jointly,
from :mod:`.config` (the validated config, the net, seeds), :mod:`.batches` (augmentation, batch sizes, the loader),
:mod:`.checkpoint` (resumable checkpoints, the files of a training folder) and :mod:`.log` (``log.csv``, whose
curves :mod:`wsiseg.viz.charts` draws into ``curves.png``).
"""

__all__: list[str] = []  # the modules are the API: wsiseg.training.loop, .config, .dataset, .annotations, ...
