# Integrations import optional packages; their modules are not collected for doctests without them.
import importlib.util

collect_ignore = []
if importlib.util.find_spec("lightning") is None:
    collect_ignore.append("geomprobe/integrations/lightning.py")
if importlib.util.find_spec("transformers") is None:
    collect_ignore.append("geomprobe/integrations/transformers.py")
