"""Training: from labelled images to a model file. :mod:`.annotations` reads annotations (GeoJSON, ASAP XML,
label masks) and class maps into label rasters, :mod:`.dataset` pairs images with annotations and cuts them into
fixed-size regions, :mod:`.mosaic` builds labelled texture mosaics from unpaired label maps, and :mod:`.loop`
trains the deformation and segmentation nets jointly (config, checkpoints, curves, the loop).
"""

__all__: list[str] = []  # the modules are the API: wsiseg.training.loop, .dataset, .annotations, .mosaic
