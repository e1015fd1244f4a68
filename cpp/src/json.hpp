// A small JSON reader (RFC 8259: objects, arrays, strings with escapes, numbers, true, false,
// null) for the export sidecar, and a string quoter for the detections the runner writes.
#pragma once

#include <string>
#include <utility>
#include <vector>

namespace rtmdet::json {

struct Value {
  enum class Type { Null, Bool, Number, String, Array, Object };

  Type type = Type::Null;
  bool boolean = false;
  double number = 0.0;
  std::string string;
  std::vector<Value> array;
  std::vector<std::pair<std::string, Value>> object;  // in file order; the last duplicate wins in find

  // The member `key` of an object, or nullptr (also for a value that is not an object).
  const Value* find(const std::string& key) const;
  bool is_integer() const;  // a number with no fraction, within +-2^53
};

// Parse a whole document; throws std::invalid_argument("<what> at byte <offset>") when malformed.
Value parse(const std::string& text);

// `text` as a JSON string literal, quotes included (UTF-8 passes through; control characters escaped).
std::string quote(const std::string& text);

}  // namespace rtmdet::json
