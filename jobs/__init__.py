"""jobs: the nrm-ood command line, the Ray Data scoring pipeline, storage and run manifests.

``cli`` (the Typer entry point, one module per command group) calls the rest, which calls ``nrm``:
``pipeline`` (the scoring job: options, checkpoint, read tasks, scoring actor, ``Run``), ``planning``
(input footers -> row-group units and read tasks), ``images`` (cells -> pixels), ``parts`` (the writer
of scored part files, and resume), ``manifest`` (the writer and readers of run manifests),
``storage`` (local paths and s3://), ``table`` (each committed run as a Delta table), ``runs`` (the
committed runs over time, their drift, pruning), ``drift`` (flagged fraction and KS distance against
the checkpoint's reference), ``filtering`` (`filter`), ``evaluate`` (`evaluate`), ``report`` and
``report_history`` (`report`), ``figures`` (PNG figures and HTML), ``bench`` (`bench`), ``demo``,
``convert`` (a user's model into a checkpoint), ``datasets`` (labelled Parquet into memory),
``allocator`` (keep freed memory in the process).
"""

__version__ = "0.1.0"
