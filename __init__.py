"""ComfyUI custom-node entry point (ComfyUI imports this file when the repository is in ``custom_nodes/``).

It does work only inside ComfyUI (``comfy.samplers`` already loaded): elsewhere (pytest, ``pip install -e .``, the
A1111 extension loader, which never imports it) it defines empty mappings and imports nothing. The package is
loaded from this folder by path, without touching ``sys.path`` (an installed ``adaptive_sampler`` is used as is).
"""

import sys

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}

if "comfy.samplers" in sys.modules:
    import importlib
    import importlib.util
    import os

    if "adaptive_sampler" not in sys.modules:
        _package = os.path.join(os.path.dirname(os.path.abspath(__file__)), "adaptive_sampler")
        _spec = importlib.util.spec_from_file_location("adaptive_sampler", os.path.join(_package, "__init__.py"),
                                                       submodule_search_locations=[_package])
        _module = importlib.util.module_from_spec(_spec)
        sys.modules["adaptive_sampler"] = _module
        try:
            _spec.loader.exec_module(_module)
        except BaseException:
            del sys.modules["adaptive_sampler"]
            raise

    _comfyui = importlib.import_module("adaptive_sampler.hosts.comfyui")
    _comfyui.register_samplers()
    NODE_CLASS_MAPPINGS = dict(_comfyui.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS = dict(_comfyui.NODE_DISPLAY_NAME_MAPPINGS)

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
