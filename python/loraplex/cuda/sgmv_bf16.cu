#include "sgmv.cuh"
LORAPLEX_INSTANTIATE(__nv_bfloat16)
