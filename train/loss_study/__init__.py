"""The loss study (``shardface study losses``): every loss trained on the same data, backbone and budget.

``study`` plans and runs it, ``losses`` names the compared losses, ``data`` prepares the data sets,
``jobs`` makes each run resumable, ``report`` writes the table, ``plots`` the figures, and
``geometry`` / ``margin_curves`` hold the measurements that only the study uses.
"""
