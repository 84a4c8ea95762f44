// Stand-in for c10's CUDA device functions in the CPU harness (one emulated device).
#pragma once

#include <c10/core/Device.h>

namespace c10::cuda {

inline c10::DeviceIndex current_device() { return 0; }
inline c10::DeviceIndex device_count() { return 1; }

}  // namespace c10::cuda
