"""The geomprobe command line (installed as ``geomprobe.cli``, console script ``geomprobe``)."""
