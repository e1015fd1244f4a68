// The post-process of rtmdet.inference.postprocess, step by step in float32 as torch computes it:
// per level sigmoid, score threshold and pre-NMS top-k, decode and clamp to the canvas, rescale
// to the photo, drop empty boxes, class-aware NMS (torchvision's batched_nms and its CPU kernel,
// both of its strategies), the first max_per_img, clip to the photo. Plain C++, no libtorch.
#pragma once

#include <cstdint>
#include <vector>

#include "sidecar.hpp"

namespace rtmdet {

// One level of one image: channels-last maps, cells row-major (the export's [1, H*W, C] outputs).
struct LevelMaps {
  const float* cls = nullptr;  // [side * side, num_classes] class logits
  const float* reg = nullptr;  // [side * side, 4] (l, t, r, b) distances in stride units
  int side = 0;                // cells per row and column: canvas / stride
  int stride = 0;
  int num_classes = 0;
};

struct Detection {
  int label = 0;
  float score = 0.f;
  float box[4] = {0.f, 0.f, 0.f, 0.f};  // x1, y1, x2, y2 in photo pixels
};

// Where the photo lies on the canvas (Letterboxed's numbers).
struct ImageGeometry {
  int canvas = 0;
  int ori_w = 0, ori_h = 0;
  double scale_w = 1.0, scale_h = 1.0;
};

// Detections of one image, in descending score order.
std::vector<Detection> postprocess(const std::vector<LevelMaps>& levels, const ImageGeometry& geometry,
                                   const PostprocessConfig& cfg);

}  // namespace rtmdet
