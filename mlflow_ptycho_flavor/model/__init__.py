"""Running a loaded network: the rich model (:class:`~.inference.PtychoTorchModel`), grouping of scan points
into network inputs (:mod:`.grouping`, reads CONFIG-001's ``params.cfg``), and stitching of predicted patches into
the object (:mod:`.stitching`). Never imports MLflow."""
