// An AOTInductor package (`rtmdet export --format aoti`, a .pt2) run through libtorch's
// AOTIModelPackageLoader: a letterboxed canvas in, its per-level outputs out.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include <opencv2/core.hpp>

#include "sidecar.hpp"

namespace rtmdet {

// One level's outputs, channels-last and contiguous (see LevelMaps).
struct LevelOutputs {
  std::vector<float> cls;  // [side * side * num_classes] logits
  std::vector<float> reg;  // [side * side * 4] distances in stride units
};

class AotiModel {
 public:
  // Load the package; RunError naming the file when it is missing or not a loadable package, or
  // compiled for cuda where libtorch sees no GPU.
  AotiModel(const std::string& path, const Sidecar& sidecar);
  ~AotiModel();
  AotiModel(const AotiModel&) = delete;
  AotiModel& operator=(const AotiModel&) = delete;

  // Run one size x size x 3 uint8 BGR canvas on the package's device (the sidecar's: cpu or
  // cuda; the outputs come back to the host, which waits for the GPU); per level, in stride
  // order. RunError when the package's outputs are not those its sidecar describes.
  std::vector<LevelOutputs> run(const cv::Mat& canvas) const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// RunError unless `path` is an existing file that starts like a zip archive (a .pt2 does).
void check_package_file(const std::string& path);

// Intra-op threads of libtorch and of the package's OpenMP kernels (0: libtorch's default).
void set_threads(int threads);

}  // namespace rtmdet
