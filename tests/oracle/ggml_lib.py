"""ggml's C API through ctypes, from the libraries llama-cpp-python ships (the oracle
scripts' common set-up): `base`, `cpu`, `InitParams`, and the signatures they use."""

import ctypes as C
import glob
import sys

libdir = glob.glob(sys.prefix + "/lib/python3*/site-packages/llama_cpp/lib/")[0]
base = C.CDLL(libdir + "libggml-base.so", mode=C.RTLD_GLOBAL)
cpu = C.CDLL(libdir + "libggml-cpu.so", mode=C.RTLD_GLOBAL)


class InitParams(C.Structure):
    _fields_ = [("mem_size", C.c_size_t), ("mem_buffer", C.c_void_p), ("no_alloc", C.c_bool)]


vp = C.c_void_p
base.ggml_init.restype, base.ggml_init.argtypes = vp, [InitParams]
base.ggml_free.argtypes = [vp]
base.ggml_new_tensor_2d.restype = vp
base.ggml_new_tensor_2d.argtypes = [vp, C.c_int, C.c_int64, C.c_int64]
base.ggml_mul_mat.restype, base.ggml_mul_mat.argtypes = vp, [vp, vp, vp]
base.ggml_new_graph.restype, base.ggml_new_graph.argtypes = vp, [vp]
base.ggml_build_forward_expand.argtypes = [vp, vp]
base.ggml_get_data.restype, base.ggml_get_data.argtypes = vp, [vp]
cpu.ggml_graph_compute_with_ctx.argtypes = [vp, vp, C.c_int]
cpu.quantize_row_q8_K.argtypes = [vp, vp, C.c_int64]
cpu.ggml_cpu_init()
