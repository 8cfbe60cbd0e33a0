"""Callbacks that attach a GeometryProbe to training frameworks in one line.

``geomprobe.integrations.lightning.GeometryProbeCallback`` (needs ``lightning``) and
``geomprobe.integrations.transformers.GeometryProbeCallback`` (needs ``transformers``). Importing
``geomprobe`` imports neither.
"""
