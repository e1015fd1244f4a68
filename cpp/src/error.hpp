// The runner's one error type: one sentence naming the file and the problem, printed as one
// line on stderr by main() before it exits with status 2 (as `rtmdet` does).
#pragma once

#include <stdexcept>
#include <string>

namespace rtmdet {

class RunError : public std::runtime_error {
 public:
  explicit RunError(const std::string& message) : std::runtime_error(message) {}
};

// The first line of a library's message (libtorch adds C++ frames, OpenCV source locations).
inline std::string first_line(const std::string& text, size_t limit = 160) {
  size_t start = text.find_first_not_of(" \t\r\n");
  if (start == std::string::npos) return "no message";
  std::string line = text.substr(start, text.find_first_of("\r\n", start) - start);
  return line.size() > limit ? line.substr(0, limit - 3) + "..." : line;
}

}  // namespace rtmdet
