// A small stand-in for GoogleTest, used when the system has no gtest. Same macros for what llmcad's
// tests use: TEST, EXPECT_/ASSERT_ EQ NE TRUE FALSE GT GE LT LE, EXPECT_THROW, EXPECT_NO_THROW,
// GTEST_SKIP; each accepts `<< message`. It defines main() (one test file per executable), which
// runs every test and returns 1 if any failed.
#pragma once
#include <cstdio>
#include <functional>
#include <iostream>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

namespace plain_gtest {

struct TestCase {
  std::string name;
  void (*body)();
};

inline std::vector<TestCase>& registry() {
  static std::vector<TestCase> tests;
  return tests;
}
inline bool& failed() {
  static bool f = false;
  return f;
}
inline bool& skipped() {
  static bool s = false;
  return s;
}

struct Registrar {
  Registrar(const char* suite, const char* name, void (*body)()) {
    registry().push_back({std::string(suite) + "." + name, body});
  }
};

class Message {
 public:
  template <class T>
  Message& operator<<(const T& v) {
    out_ << v;
    return *this;
  }
  std::string str() const { return out_.str(); }

 private:
  std::ostringstream out_;
};

// `helper = Message() << ...` reports a failure; operator= returns void so ASSERT_* can `return` it.
class FailureHelper {
 public:
  FailureHelper(const char* file, int line, std::string what) : file_(file), line_(line), what_(std::move(what)) {}
  void operator=(const Message& m) const {
    failed() = true;
    std::cerr << file_ << ":" << line_ << ": Failure: " << what_;
    std::string extra = m.str();
    if (!extra.empty()) std::cerr << " -- " << extra;
    std::cerr << std::endl;
  }

 private:
  const char* file_;
  int line_;
  std::string what_;
};

class SkipHelper {
 public:
  void operator=(const Message& m) const {
    skipped() = true;
    std::cout << "  skipped: " << m.str() << std::endl;
  }
};

template <class T>
auto show(std::ostream& os, const T& v, int) -> decltype(os << v, void()) {
  os << v;
}
template <class T>
void show(std::ostream& os, const T&, long) {
  os << "<value>";
}

// Result of a comparison: true, or false with both values printed.
struct Check {
  bool ok;
  std::string detail;
  explicit operator bool() const { return ok; }
};

template <class A, class B, class Op>
Check compare(const A& a, const B& b, Op op, const char* text) {
  if (op(a, b)) return {true, {}};
  std::ostringstream os;
  os << text << " with values ";
  show(os, a, 0);
  os << " and ";
  show(os, b, 0);
  return {false, os.str()};
}

template <class E, class F>
bool throws(F&& f) {
  try {
    f();
  } catch (const E&) {
    return true;
  } catch (...) {
    return false;
  }
  return false;
}

template <class F>
bool no_throw(F&& f) {
  try {
    f();
  } catch (...) {
    return false;
  }
  return true;
}

}  // namespace plain_gtest

#define TEST(suite, name)                                                                            \
  static void plain_gtest_##suite##_##name();                                                        \
  static ::plain_gtest::Registrar plain_gtest_reg_##suite##_##name(#suite, #name, &plain_gtest_##suite##_##name); \
  static void plain_gtest_##suite##_##name()

#define PLAIN_GTEST_FAIL_(text) ::plain_gtest::FailureHelper(__FILE__, __LINE__, text) = ::plain_gtest::Message()
#define PLAIN_GTEST_EXPECT_(check) \
  if (const ::plain_gtest::Check plain_gtest_c = (check)) { \
  } else                                                    \
    PLAIN_GTEST_FAIL_(plain_gtest_c.detail)
#define PLAIN_GTEST_ASSERT_(check) \
  if (const ::plain_gtest::Check plain_gtest_c = (check)) { \
  } else                                                    \
    return PLAIN_GTEST_FAIL_(plain_gtest_c.detail)
#define PLAIN_GTEST_CMP_(a, b, op, name) \
  ::plain_gtest::compare((a), (b), [](const auto& x, const auto& y) { return x op y; }, name "(" #a ", " #b ")")
#define PLAIN_GTEST_BOOL_(c, want, name) \
  ::plain_gtest::Check{static_cast<bool>(c) == (want), name "(" #c ")"}

#define EXPECT_EQ(a, b) PLAIN_GTEST_EXPECT_(PLAIN_GTEST_CMP_(a, b, ==, "EXPECT_EQ"))
#define EXPECT_NE(a, b) PLAIN_GTEST_EXPECT_(PLAIN_GTEST_CMP_(a, b, !=, "EXPECT_NE"))
#define EXPECT_GT(a, b) PLAIN_GTEST_EXPECT_(PLAIN_GTEST_CMP_(a, b, >, "EXPECT_GT"))
#define EXPECT_GE(a, b) PLAIN_GTEST_EXPECT_(PLAIN_GTEST_CMP_(a, b, >=, "EXPECT_GE"))
#define EXPECT_LT(a, b) PLAIN_GTEST_EXPECT_(PLAIN_GTEST_CMP_(a, b, <, "EXPECT_LT"))
#define EXPECT_LE(a, b) PLAIN_GTEST_EXPECT_(PLAIN_GTEST_CMP_(a, b, <=, "EXPECT_LE"))
#define EXPECT_TRUE(c) PLAIN_GTEST_EXPECT_(PLAIN_GTEST_BOOL_(c, true, "EXPECT_TRUE"))
#define EXPECT_FALSE(c) PLAIN_GTEST_EXPECT_(PLAIN_GTEST_BOOL_(c, false, "EXPECT_FALSE"))
#define ASSERT_EQ(a, b) PLAIN_GTEST_ASSERT_(PLAIN_GTEST_CMP_(a, b, ==, "ASSERT_EQ"))
#define ASSERT_NE(a, b) PLAIN_GTEST_ASSERT_(PLAIN_GTEST_CMP_(a, b, !=, "ASSERT_NE"))
#define ASSERT_GE(a, b) PLAIN_GTEST_ASSERT_(PLAIN_GTEST_CMP_(a, b, >=, "ASSERT_GE"))
#define ASSERT_TRUE(c) PLAIN_GTEST_ASSERT_(PLAIN_GTEST_BOOL_(c, true, "ASSERT_TRUE"))
#define ASSERT_FALSE(c) PLAIN_GTEST_ASSERT_(PLAIN_GTEST_BOOL_(c, false, "ASSERT_FALSE"))
#define EXPECT_THROW(stmt, type)                                                    \
  PLAIN_GTEST_EXPECT_((::plain_gtest::Check{::plain_gtest::throws<type>([&] { stmt; }), \
                                            "EXPECT_THROW(" #stmt ", " #type ")"}))
#define EXPECT_NO_THROW(stmt)                                                       \
  PLAIN_GTEST_EXPECT_((::plain_gtest::Check{::plain_gtest::no_throw([&] { stmt; }), \
                                            "EXPECT_NO_THROW(" #stmt ")"}))
#define GTEST_SKIP() return ::plain_gtest::SkipHelper() = ::plain_gtest::Message()

int main() {
  int failures = 0;
  for (const auto& t : ::plain_gtest::registry()) {
    ::plain_gtest::failed() = false;
    ::plain_gtest::skipped() = false;
    std::cout << "[ RUN      ] " << t.name << std::endl;
    try {
      t.body();
    } catch (const std::exception& e) {
      std::cerr << "uncaught exception: " << e.what() << std::endl;
      ::plain_gtest::failed() = true;
    } catch (...) {
      std::cerr << "uncaught exception" << std::endl;
      ::plain_gtest::failed() = true;
    }
    failures += ::plain_gtest::failed();
    std::cout << (::plain_gtest::failed() ? "[  FAILED  ] " : ::plain_gtest::skipped() ? "[  SKIPPED ] " : "[       OK ] ")
              << t.name << std::endl;
  }
  std::cout << ::plain_gtest::registry().size() << " tests, " << failures << " failed" << std::endl;
  return failures ? 1 : 0;
}
