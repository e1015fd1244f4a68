#include "postprocess.hpp"

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <map>
#include <numeric>

namespace rtmdet {

namespace {

constexpr int64_t kPreselect = 4096;     // rtmdet.inference.postprocess.PRESELECT
constexpr int64_t kVanillaNumel = 4000;  // torchvision's batched_nms: per-class NMS above this many coordinates (CPU)

using Box = std::array<float, 4>;

struct Candidate {
  Box box;
  float score;
  int label;
};

float sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }

float clamp(float v, float low, float high) { return std::min(std::max(v, low), high); }

// Positions of `scores` by descending score. Exact ties keep their index order; torch's sort and
// topk order exact ties their own way (cpp/README.md, "Exactness").
std::vector<int64_t> order_desc(const std::vector<float>& scores) {
  std::vector<int64_t> order(scores.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return scores[a] > scores[b]; });
  return order;
}

// _level_candidates: every (cell, class) over score_thr, at most nms_pre of them, decoded.
void level_candidates(const LevelMaps& level, int canvas, const PostprocessConfig& cfg, std::vector<Candidate>& out) {
  const int64_t classes = level.num_classes;
  const int64_t count = int64_t(level.side) * level.side * classes;
  // torch compares a float32 tensor with a Python float in float32.
  const float threshold = static_cast<float>(cfg.score_thr);
  std::vector<float> scores(count);
  std::vector<int64_t> picked;
  for (int64_t j = 0; j < count; ++j) {
    scores[j] = sigmoid(level.cls[j]);
    if (scores[j] > threshold) picked.push_back(j);  // row-major (cell, class): nonzero's order
  }
  if (count > cfg.nms_pre) {  // the nms_pre best of those over the threshold, best first (topk's order)
    std::stable_sort(picked.begin(), picked.end(), [&](int64_t a, int64_t b) { return scores[a] > scores[b]; });
    if (int64_t(picked.size()) > cfg.nms_pre) picked.resize(cfg.nms_pre);
  }
  const float stride = static_cast<float>(level.stride), size = static_cast<float>(canvas);
  for (int64_t j : picked) {
    const int64_t cell = j / classes;
    const float x = static_cast<float>((cell % level.side) * level.stride);
    const float y = static_cast<float>((cell / level.side) * level.stride);
    const float* d = level.reg + cell * 4;
    // Distances in stride units times a power-of-two stride: exact, as rtmdet's to_level_maps.
    Box box = {clamp(x - d[0] * stride, 0.f, size), clamp(y - d[1] * stride, 0.f, size),
               clamp(x + d[2] * stride, 0.f, size), clamp(y + d[3] * stride, 0.f, size)};
    out.push_back({box, scores[j], static_cast<int>(j % classes)});
  }
}

// torchvision's CPU nms kernel: greedy by descending score; IoU in float32, compared in double.
std::vector<int64_t> nms(const std::vector<Box>& boxes, const std::vector<float>& scores, double iou_thr) {
  const size_t n = boxes.size();
  std::vector<float> areas(n);
  for (size_t i = 0; i < n; ++i) areas[i] = (boxes[i][2] - boxes[i][0]) * (boxes[i][3] - boxes[i][1]);
  std::vector<int64_t> order = order_desc(scores), keep;
  std::vector<char> suppressed(n, 0);
  for (size_t a = 0; a < n; ++a) {
    const int64_t i = order[a];
    if (suppressed[i]) continue;
    keep.push_back(i);
    const Box& bi = boxes[i];
    for (size_t b = a + 1; b < n; ++b) {
      const int64_t j = order[b];
      if (suppressed[j]) continue;
      const float w = std::max(0.f, std::min(bi[2], boxes[j][2]) - std::max(bi[0], boxes[j][0]));
      const float h = std::max(0.f, std::min(bi[3], boxes[j][3]) - std::max(bi[1], boxes[j][1]));
      const float inter = w * h;
      const float iou = inter / (areas[i] + areas[j] - inter);
      if (static_cast<double>(iou) > iou_thr) suppressed[j] = 1;
    }
  }
  return keep;
}

// torchvision.ops.batched_nms: positions in `c` kept, by descending score. Few boxes: one NMS over
// boxes offset per class (the offsets round coordinates, so they are computed as torch does);
// many: one NMS per class.
std::vector<int64_t> batched_nms(const std::vector<Candidate>& c, double iou_thr) {
  const int64_t n = static_cast<int64_t>(c.size());
  std::vector<float> scores(n);
  for (int64_t i = 0; i < n; ++i) scores[i] = c[i].score;
  if (n == 0) return {};
  if (4 * n > kVanillaNumel) {
    std::map<int, std::vector<int64_t>> members;  // class -> positions, ascending
    for (int64_t i = 0; i < n; ++i) members[c[i].label].push_back(i);
    std::vector<char> kept(n, 0);
    for (const auto& [label, positions] : members) {
      std::vector<Box> boxes;
      std::vector<float> class_scores;
      for (int64_t i : positions) {
        boxes.push_back(c[i].box);
        class_scores.push_back(c[i].score);
      }
      for (int64_t k : nms(boxes, class_scores, iou_thr)) kept[positions[k]] = 1;
    }
    std::vector<int64_t> keep;
    for (int64_t i = 0; i < n; ++i)
      if (kept[i]) keep.push_back(i);
    std::stable_sort(keep.begin(), keep.end(), [&](int64_t a, int64_t b) { return scores[a] > scores[b]; });
    return keep;
  }
  float max_coordinate = -std::numeric_limits<float>::infinity();
  for (const auto& cand : c)
    for (float v : cand.box) max_coordinate = std::max(max_coordinate, v);
  const float step = max_coordinate + 1.0f;
  std::vector<Box> shifted(n);
  for (int64_t i = 0; i < n; ++i) {
    const float offset = static_cast<float>(c[i].label) * step;
    for (int k = 0; k < 4; ++k) shifted[i][k] = c[i].box[k] + offset;
  }
  return nms(shifted, scores, iou_thr);
}

// rtmdet's _nms: NMS of the best candidates first when there are many (exactly the full NMS's
// answer when it keeps max_per_img of them), else of all; the first max_per_img.
std::vector<int64_t> select(const std::vector<Candidate>& c, const PostprocessConfig& cfg) {
  const int64_t best = std::max<int64_t>(kPreselect, 8 * cfg.max_per_img);
  const size_t max_det = static_cast<size_t>(cfg.max_per_img);
  if (int64_t(c.size()) > best) {
    std::vector<float> scores(c.size());
    for (size_t i = 0; i < c.size(); ++i) scores[i] = c[i].score;
    std::vector<int64_t> order = order_desc(scores);
    if (scores[order[best - 1]] > scores[order[best]]) {
      std::vector<Candidate> top;
      for (int64_t k = 0; k < best; ++k) top.push_back(c[order[k]]);
      std::vector<int64_t> keep = batched_nms(top, cfg.iou_thr);
      if (keep.size() >= max_det) {
        std::vector<int64_t> chosen;
        for (size_t k = 0; k < max_det; ++k) chosen.push_back(order[keep[k]]);
        return chosen;
      }
    }
  }
  std::vector<int64_t> keep = batched_nms(c, cfg.iou_thr);
  if (keep.size() > max_det) keep.resize(max_det);
  return keep;
}

}  // namespace

std::vector<Detection> postprocess(const std::vector<LevelMaps>& levels, const ImageGeometry& geometry,
                                   const PostprocessConfig& cfg) {
  std::vector<Candidate> candidates;
  for (const LevelMaps& level : levels) level_candidates(level, geometry.canvas, cfg, candidates);
  // Back to photo pixels by the float32 reciprocal of the scale factor, as mmdetection does.
  const float inv_w = static_cast<float>(1.0 / geometry.scale_w), inv_h = static_cast<float>(1.0 / geometry.scale_h);
  const float min_size = static_cast<float>(cfg.min_bbox_size);
  std::vector<Candidate> valid;
  for (Candidate c : candidates) {
    c.box = {c.box[0] * inv_w, c.box[1] * inv_h, c.box[2] * inv_w, c.box[3] * inv_h};
    if (c.box[2] - c.box[0] > min_size && c.box[3] - c.box[1] > min_size) valid.push_back(c);
  }
  std::vector<Detection> found;
  const float w = static_cast<float>(geometry.ori_w), h = static_cast<float>(geometry.ori_h);
  for (int64_t i : select(valid, cfg)) {
    const Box& b = valid[i].box;
    Detection d;
    d.label = valid[i].label;
    d.score = valid[i].score;
    d.box[0] = clamp(b[0], 0.f, w);
    d.box[1] = clamp(b[1], 0.f, h);
    d.box[2] = clamp(b[2], 0.f, w);
    d.box[3] = clamp(b[3], 0.f, h);
    found.push_back(d);
  }
  return found;
}

}  // namespace rtmdet
