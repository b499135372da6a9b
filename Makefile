# vmd for Linux: build, test, install, demo.

PREFIX ?= /usr/local
DESTDIR ?=
SBINDIR = $(DESTDIR)$(PREFIX)/sbin
MANDIR = $(DESTDIR)$(PREFIX)/share/man
CARGO ?= cargo

.PHONY: all build test regress regress-nested install demo bench bench-nested setup setup-bench clean

all:
	$(CARGO) build --release --workspace

build:
	$(CARGO) build --workspace

# Install what the tests need (Debian packages, the _vmd user), then run
# the unit tests, the end-to-end tests of a vmd built with test-triggers
# (into its own target directory, as regress/ builds it) and every
# regress suite.
test: setup build
	$(CARGO) test --workspace
	$(CARGO) test -p vmd --features test-triggers --target-dir target/test-triggers --test command_fd
	$(MAKE) regress

setup:
	sh regress/setup

regress: build
	sh regress/run

# Only regress/nested, every case: vmd with real KVM inside a nested KVM
# host that QEMU emulates (make test runs its default cases).
regress-nested: build
	sh regress/nested/run --all

# vmd against what users would pick instead (libvirt, bare QEMU,
# qemu-img), side by side in one run: prints one table and writes it to
# target/bench/ (regress/bench.d/README.md). Installs libvirt for it.
bench: setup-bench all
	sh regress/bench

setup-bench:
	sh regress/setup --bench

# Start to guest under real KVM, inside regress/nested's KVM host.
bench-nested: setup all
	sh regress/bench --nested

# Boots the test guest in demo mode under vmd and attaches to its shell
# with vmctl console (examples/demo; ~. leaves, then the demo stops the
# VM and vmd). As root.
# Installs what the guest needs on a fresh machine, like make test.
demo: setup all
	sh examples/demo target/release

install: all
	install -d $(SBINDIR) $(MANDIR)/man5 $(MANDIR)/man8
	install -m 0555 target/release/vmd target/release/vmctl $(SBINDIR)
	install -m 0444 vm.conf.5 $(MANDIR)/man5
	install -m 0444 vmctl.8 vmd/vmd.8 $(MANDIR)/man8
	sh regress/setup --user-only

clean:
	$(CARGO) clean
