# Thin wrapper over CMake. Every target installs what is missing first
# (deploy/deps.sh: Debian packages, sudo when not root, quiet when present).
#
#   make            build (Release) into build/
#   make test       install deps, build, run every test through ctest
#   make asan       the same tests on an ASan+UBSan build (build-asan/)
#   make fuzz       short smoke of every libFuzzer target (build-fuzz/)
#   make demo       gateway + client + HTTPS endpoint on loopback, one page
#                   fetched through the tunnel by SNI, everything stopped
#   make bench      the benchmark suite (bench/run; about 10 minutes)
#   make soak       soak test, not in CI (tests/soak; SOAK_SECONDS=600 by default)
#   make clean

MAKEFLAGS  += --no-print-directory
BUILD      ?= build
JOBS       ?= $(shell nproc)
# ctest slots: e2e files mostly wait on timers, so two per CPU; the few
# marked cpu-heavy take every slot (CMakeLists.txt).
TEST_JOBS  ?= $(shell expr $$(nproc) \* 2)
FUZZ_SECONDS ?= 20
SOAK_SECONDS ?= 600
CTEST_ARGS ?=

.PHONY: all deps build test asan fuzz demo bench bench-quick soak clean

all: build

deps:
	@./deploy/deps.sh

build: deps
	@cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=Release >/dev/null
	@cmake --build $(BUILD) -j $(JOBS)

test: build
	@cd $(BUILD) && ctest --output-on-failure -j $(TEST_JOBS) $(CTEST_ARGS)

asan: deps
	@cmake -S . -B build-asan -DCMAKE_BUILD_TYPE=Debug -DSNITUN_SANITIZE=ON >/dev/null
	@cmake --build build-asan -j $(JOBS)
	@cd build-asan && ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 \
	  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	  ctest --output-on-failure -j $(TEST_JOBS) $(CTEST_ARGS)

fuzz: deps
	@cmake -S . -B build-fuzz -DCMAKE_BUILD_TYPE=Debug -DCMAKE_C_COMPILER=clang \
	  -DSNITUN_FUZZ=ON >/dev/null
	@cmake --build build-fuzz -j $(JOBS)
	@./tests/fuzz/smoke.sh build-fuzz $(FUZZ_SECONDS)

demo: build
	@./deploy/demo.sh $(BUILD)

bench:
	@./bench/run --build $(BUILD) $(BENCH_ARGS)

bench-quick:
	@./bench/run --quick --build $(BUILD) $(BENCH_ARGS)

soak: build
	@python3 tests/soak/soak.py --bin $(BUILD)/snitun --duration $(SOAK_SECONDS)

clean:
	rm -rf $(BUILD) build-asan build-fuzz
