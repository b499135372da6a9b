# vmd for Linux: build, test, install, demo.

PREFIX ?= /usr/local
DESTDIR ?=
SBINDIR = $(DESTDIR)$(PREFIX)/sbin
MANDIR = $(DESTDIR)$(PREFIX)/share/man
UNITDIR = $(DESTDIR)/etc/systemd/system
INITDIR = $(DESTDIR)/etc/init.d
CARGO ?= cargo

.PHONY: all build test regress regress-nested install deb demo bench bench-nested setup setup-bench clean

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

# The binaries, the man pages, the systemd unit and the init script
# (both naming $(PREFIX)/sbin/vmd); neither is enabled. An existing
# /etc/init.d/vmd is kept.
install: all
	install -d $(SBINDIR) $(MANDIR)/man5 $(MANDIR)/man8 $(UNITDIR) $(INITDIR)
	install -m 0555 target/release/vmd target/release/vmctl $(SBINDIR)
	install -m 0444 vm.conf.5 $(MANDIR)/man5
	install -m 0444 vmctl.8 vmd/vmd.8 $(MANDIR)/man8
	sed 's|/usr/sbin/vmd|$(PREFIX)/sbin/vmd|g' etc/vmd.service >$(UNITDIR)/vmd.service
	chmod 0644 $(UNITDIR)/vmd.service
	[ -e $(INITDIR)/vmd ] || { sed 's|^DAEMON=/usr/sbin/vmd$$|DAEMON=$(PREFIX)/sbin/vmd|' \
		etc/init.d/vmd >$(INITDIR)/vmd && chmod 0755 $(INITDIR)/vmd; }
	sh regress/setup --user-only

# A Debian package of the release build: target/deb/vmd_VERSION_ARCH.deb
# (pkg/deb/build, dpkg-deb). Install it with apt install ./target/deb/vmd_*.deb.
deb: all
	sh pkg/deb/build target/release target/deb

clean:
	$(CARGO) clean
