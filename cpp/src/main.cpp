// rtmdet_run: detect objects in one photo with an AOTInductor package exported by
// `rtmdet export --format aoti`, and print the detections as JSON; no Python at run time.
//
//   rtmdet_run MODEL.pt2 IMAGE [--out FILE] [--sidecar FILE] [--score-thr X] [--nms-pre N]
//              [--iou-thr X] [--max-det N] [--min-size X] [--threads N] [--dump-canvas FILE] [--time]
//              [--repeat N]
//
// Pre- and post-process are rtmdet.inference's (image.cpp, postprocess.cpp); the post-process
// defaults come from the sidecar. Any bad input: one line on stderr, exit status 2.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <iostream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include <opencv2/core.hpp>
#include <opencv2/core/utils/logger.hpp>

#include "error.hpp"
#include "image.hpp"
#include "json.hpp"
#include "model.hpp"
#include "postprocess.hpp"
#include "sidecar.hpp"

namespace {

using rtmdet::RunError;

constexpr const char* kUsage =
    "usage: rtmdet_run MODEL.pt2 IMAGE [--out FILE] [--sidecar FILE] [--score-thr X] [--nms-pre N] "
    "[--iou-thr X] [--max-det N] [--min-size X] [--threads N] [--dump-canvas FILE] [--time] [--repeat N]";

struct Options {
  std::string model, image, sidecar, out, dump_canvas;
  std::map<std::string, double> overrides;  // post-process flags given
  int threads = 0;
  int repeat = 0;  // with --time: run the model this many more times and report their median
  bool time = false;
};

double number_arg(const std::string& flag, const std::string& text, bool integer) {
  size_t used = 0;
  double value = 0;
  try {
    value = std::stod(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used != text.size() || value < 0 || (integer && value != static_cast<double>(static_cast<long long>(value))))
    throw RunError(flag + ": expected a non-negative " + (integer ? "integer" : "number") + ", got '" + text + "'");
  return value;
}

Options parse_args(int argc, char** argv) {
  Options o;
  std::vector<std::string> positional;
  const std::map<std::string, bool> numeric = {{"--score-thr", false}, {"--nms-pre", true}, {"--iou-thr", false},
                                               {"--max-det", true},    {"--min-size", false}, {"--threads", true},
                                               {"--repeat", true}};
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw RunError(arg + ": expected a value (" + std::string(kUsage) + ")");
      return argv[++i];
    };
    if (arg == "--help" || arg == "-h") {
      std::cout << kUsage << "\n";
      std::exit(0);
    } else if (arg == "--out") {
      o.out = value();
    } else if (arg == "--sidecar") {
      o.sidecar = value();
    } else if (arg == "--dump-canvas") {
      o.dump_canvas = value();
    } else if (arg == "--time") {
      o.time = true;
    } else if (numeric.count(arg)) {
      double v = number_arg(arg, value(), numeric.at(arg));
      if (arg == "--threads") o.threads = static_cast<int>(v);
      else if (arg == "--repeat") o.repeat = static_cast<int>(v);
      else o.overrides[arg] = v;
    } else if (arg.size() > 1 && arg[0] == '-') {
      throw RunError("unknown option " + arg + " (" + kUsage + ")");
    } else {
      positional.push_back(arg);
    }
  }
  if (positional.size() != 2) throw RunError(kUsage);
  o.model = positional[0];
  o.image = positional[1];
  if (o.sidecar.empty()) o.sidecar = rtmdet::sidecar_path_for(o.model);
  return o;
}

rtmdet::PostprocessConfig postprocess_config(const rtmdet::Sidecar& sidecar, const Options& o) {
  rtmdet::PostprocessConfig cfg = sidecar.postprocess;
  for (const auto& [flag, v] : o.overrides) {
    if (flag == "--score-thr") cfg.score_thr = v;
    if (flag == "--nms-pre") cfg.nms_pre = static_cast<int64_t>(v);
    if (flag == "--iou-thr") cfg.iou_thr = v;
    if (flag == "--max-det") cfg.max_per_img = static_cast<int64_t>(v);
    if (flag == "--min-size") cfg.min_bbox_size = v;
  }
  return cfg;
}

std::string number(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.9g", v);  // 9 digits give a float32 back exactly
  return buf;
}

std::string to_json(const Options& o, const rtmdet::Letterboxed& lb, const rtmdet::Sidecar& sidecar,
                    const std::vector<rtmdet::Detection>& found) {
  std::ostringstream out;
  out << "{\"model\": " << rtmdet::json::quote(o.model) << ", \"image\": " << rtmdet::json::quote(o.image)
      << ", \"width\": " << lb.ori_w << ", \"height\": " << lb.ori_h << ", \"detections\": [";
  for (size_t i = 0; i < found.size(); ++i) {
    const rtmdet::Detection& d = found[i];
    out << (i ? ",\n  " : "\n  ") << "{\"label\": " << d.label
        << ", \"class\": " << rtmdet::json::quote(sidecar.classes[d.label]) << ", \"score\": " << number(d.score)
        << ", \"box\": [" << number(d.box[0]) << ", " << number(d.box[1]) << ", " << number(d.box[2]) << ", "
        << number(d.box[3]) << "]}";
  }
  out << (found.empty() ? "]}\n" : "\n]}\n");
  return out.str();
}

// Write through a temporary name and a rename, so a killed run never leaves half a file.
void write_file(const std::string& path, const std::string& data) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream file(tmp, std::ios::binary | std::ios::trunc);
    file.write(data.data(), static_cast<std::streamsize>(data.size()));
    if (!file) throw RunError(path + ": cannot write the output file");
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    std::remove(tmp.c_str());
    throw RunError(path + ": cannot write the output file");
  }
}

double elapsed_ms(std::chrono::steady_clock::time_point since) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - since).count();
}

int run(int argc, char** argv) {
  const Options o = parse_args(argc, argv);
  rtmdet::set_threads(o.threads);
  auto start = std::chrono::steady_clock::now();
  // Cheap checks first, so a bad input never waits for the package to load.
  rtmdet::check_package_file(o.model);
  const rtmdet::Sidecar sidecar = rtmdet::read_sidecar(o.sidecar);
  const cv::Mat image = rtmdet::read_image(o.image);
  const rtmdet::AotiModel model(o.model, sidecar);
  const double load_ms = elapsed_ms(start);

  start = std::chrono::steady_clock::now();
  const rtmdet::Letterboxed lb = rtmdet::letterbox(image, sidecar.image_size);
  if (!o.dump_canvas.empty())
    write_file(o.dump_canvas, std::string(reinterpret_cast<const char*>(lb.canvas.data), lb.canvas.total() * 3));
  const double pre_ms = elapsed_ms(start);

  start = std::chrono::steady_clock::now();
  const std::vector<rtmdet::LevelOutputs> outputs = model.run(lb.canvas);
  const double model_ms = elapsed_ms(start);
  // The first call pays for warm-up (a GPU's kernels and memory, the CPU's thread pool); --repeat
  // times the calls after it, each one canvas in and outputs back on the host.
  std::vector<double> again;
  for (int i = 0; i < o.repeat; ++i) {
    start = std::chrono::steady_clock::now();
    model.run(lb.canvas);
    again.push_back(elapsed_ms(start));
  }

  start = std::chrono::steady_clock::now();
  std::vector<rtmdet::LevelMaps> levels;
  for (size_t l = 0; l < outputs.size(); ++l)
    levels.push_back({outputs[l].cls.data(), outputs[l].reg.data(), sidecar.image_size / sidecar.strides[l],
                      sidecar.strides[l], static_cast<int>(sidecar.classes.size())});
  const rtmdet::ImageGeometry geometry{sidecar.image_size, lb.ori_w, lb.ori_h, lb.scale_w, lb.scale_h};
  const std::vector<rtmdet::Detection> found = rtmdet::postprocess(levels, geometry, postprocess_config(sidecar, o));
  const double post_ms = elapsed_ms(start);

  const std::string text = to_json(o, lb, sidecar, found);
  if (o.out.empty()) std::cout << text << std::flush;
  else write_file(o.out, text);
  if (o.time) {
    std::fprintf(stderr, "time: load %.1f ms, letterbox %.2f ms, model %.2f ms, postprocess %.2f ms", load_ms, pre_ms,
                 model_ms, post_ms);
    if (!again.empty()) {
      std::sort(again.begin(), again.end());
      const size_t n = again.size();
      const double median = n % 2 ? again[n / 2] : (again[n / 2 - 1] + again[n / 2]) / 2;
      std::fprintf(stderr, "; model again: median %.3f ms of %zu", median, n);
    }
    std::fprintf(stderr, "\n");
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  // OpenCV logs decoder failures itself; the one line below says it all.
  cv::utils::logging::setLogLevel(cv::utils::logging::LOG_LEVEL_SILENT);
  try {
    return run(argc, argv);
  } catch (const std::exception& exc) {  // RunError, and anything a library throws
    std::fprintf(stderr, "error: %s\n", rtmdet::first_line(exc.what()).c_str());
    return 2;
  }
}
