#include "sgmv.cuh"
LORAPLEX_INSTANTIATE(float)
