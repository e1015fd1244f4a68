// rtmdet_run's model and post-process (cpp/src/model.cpp, postprocess.cpp, sidecar.cpp) over a
// raw S x S x 3 BGR canvas instead of a photo: the runner's libtorch and post-process path, CUDA
// included, on a machine without OpenCV. Built and driven by benchmarks/aoti_cpp_check.py.
//
//   canvas_run PACKAGE.pt2 CANVAS.bin SCORE_THR REPEAT
//
// Prints one JSON object: device, load_ms, run_median_ms (REPEAT calls after the first, each one
// canvas in and the outputs back on the host) and detections [label, score, x1, y1, x2, y2] in
// canvas pixels.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <vector>

#include "model.hpp"
#include "postprocess.hpp"
#include "sidecar.hpp"

namespace {

double ms_since(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t).count();
}

}  // namespace

int main(int argc, char** argv) {
  try {
    if (argc != 5) {
      std::fprintf(stderr, "usage: canvas_run PACKAGE.pt2 CANVAS.bin SCORE_THR REPEAT\n");
      return 2;
    }
    const rtmdet::Sidecar sc = rtmdet::read_sidecar(rtmdet::sidecar_path_for(argv[1]));
    std::ifstream file(argv[2], std::ios::binary);
    std::vector<unsigned char> bytes((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
    if (bytes.size() != size_t(sc.image_size) * sc.image_size * 3) {
      std::fprintf(stderr, "error: %s: %zu bytes, not a %d x %d x 3 canvas\n", argv[2], bytes.size(), sc.image_size,
                   sc.image_size);
      return 2;
    }
    cv::Mat canvas;
    canvas.data = bytes.data();
    auto start = std::chrono::steady_clock::now();
    const rtmdet::AotiModel model(argv[1], sc);
    const double load_ms = ms_since(start);
    const std::vector<rtmdet::LevelOutputs> outs = model.run(canvas);
    std::vector<double> again;
    for (int i = 0; i < std::atoi(argv[4]); ++i) {
      start = std::chrono::steady_clock::now();
      model.run(canvas);
      again.push_back(ms_since(start));
    }
    std::sort(again.begin(), again.end());
    std::vector<rtmdet::LevelMaps> levels;
    for (size_t l = 0; l < outs.size(); ++l)
      levels.push_back({outs[l].cls.data(), outs[l].reg.data(), sc.image_size / sc.strides[l], sc.strides[l],
                        static_cast<int>(sc.classes.size())});
    rtmdet::PostprocessConfig cfg = sc.postprocess;
    cfg.score_thr = std::atof(argv[3]);
    const rtmdet::ImageGeometry geometry{sc.image_size, sc.image_size, sc.image_size, 1.0, 1.0};
    const std::vector<rtmdet::Detection> found = rtmdet::postprocess(levels, geometry, cfg);
    std::printf("{\"device\": \"%s\", \"load_ms\": %.1f, \"run_median_ms\": %.3f, \"detections\": [", sc.device.c_str(),
                load_ms, again.empty() ? -1.0 : again[again.size() / 2]);
    for (size_t i = 0; i < found.size(); ++i)
      std::printf("%s[%d, %.9g, %.9g, %.9g, %.9g, %.9g]", i ? ", " : "", found[i].label, found[i].score,
                  found[i].box[0], found[i].box[1], found[i].box[2], found[i].box[3]);
    std::printf("]}\n");
    return 0;
  } catch (const std::exception& exc) {
    std::fprintf(stderr, "error: %s\n", exc.what());
    return 2;
  }
}
