#!/bin/bash
# tests/systemd/lab.sh -- a throw-away REAL systemd, PID 1 of its own PID/mount/network/UTS/IPC/
# cgroup namespaces, for testing simpletun@.service on a machine (CI, sandbox VM) where systemd is
# installed but is not PID 1. Root only. No image: the lab's root file system is a copy-on-write
# overlay of this machine's "/" (so this checkout and its .venv are visible inside; writes go to a
# tmpfs and vanish with the lab). Boots in about half a second.
#
#   lab.sh start [DIR...]   boot a lab and leave it running; prints its directory LAB on stdout.
#                           Each DIR is bind-mounted read-only at the same path inside: needed for
#                           a checkout under /tmp or /run, which the lab replaces with its own.
#   lab.sh exec LAB CMD...  run CMD inside the lab (all its namespaces, its root, clean environment)
#   lab.sh stop LAB         shut the lab down, remove everything it left (idempotent)
#   lab.sh run CMD...       start, run CMD inside, stop; exits with CMD's status (for a manual look:
#                           `lab.sh run bash`)
#
# Environment: LAB_TMPDIR (default /tmp) where LAB directories go; LAB_KEEP=1 keeps LAB (with
# console.log, systemd's console output) after stop.
#
# How (the "container interface" of systemd done by hand, as systemd-nspawn does it):
#  1. a cgroup v2 directory for the lab (pure v2 or the "unified" tree of a hybrid host);
#  2. setsid script (a pty for /dev/console) -> unshare --mount --pid --fork --net --uts --ipc:
#     PID 1 of a new PID namespace, which moves into the lab cgroup and unshares a cgroup namespace;
#  3. root = overlayfs (lower /, upper tmpfs), every other real file system under / overlaid too;
#     fresh /proc (/proc/sys read-only except /proc/sys/net), read-only /sys (no udev), cgroup2,
#     a tmpfs /dev with the usual nodes and /dev/net/tun, tmpfs /run /tmp /var/log/journal;
#  4. own machine id and host name, fstab generator masked, boot target = sysinit + sockets only
#     (none of this machine's services start);
#  5. pivot_root, drop capabilities that act on the machine (modules, clock, raw I/O, ...), exec
#     systemd with container=simpletun-lab (so it and systemd-shutdown leave the machine alone);
#  6. stop: kill the commands entered with nsenter (their parent is outside the namespace; when
#     systemd SIGSTOPs everything at shutdown they would hold PID 1), SIGRTMIN+3 (halt) to PID 1,
#     SIGKILL after 10 s; namespaces and mounts go with PID 1; remove the cgroup and directory.
set -euo pipefail

SELF=$(readlink -f "$0")
SYSTEMD_BIN=/lib/systemd/systemd
[ -x "$SYSTEMD_BIN" ] || SYSTEMD_BIN=/usr/lib/systemd/systemd
LAB_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
DROP_CAPS=-sys_module,-sys_time,-sys_rawio,-syslog,-wake_alarm,-block_suspend,-sys_pacct,-mac_admin,-mac_override
BOOT_TIMEOUT=60

die() { printf 'lab.sh: error: %s\n' "$*" >&2; exit 1; }

cgroup_root() {
    if [ "$(stat -fc %T /sys/fs/cgroup 2>/dev/null)" = cgroup2fs ]; then echo /sys/fs/cgroup
    elif [ "$(stat -fc %T /sys/fs/cgroup/unified 2>/dev/null)" = cgroup2fs ]; then echo /sys/fs/cgroup/unified
    else return 1; fi
}

# Alive and not a zombie?
alive() {
    local st
    st=$(sed -n 's/^State:[[:space:]]*//p' "/proc/$1/status" 2>/dev/null) && [ -n "$st" ] && [ "${st:0:1}" != Z ]
}

lab_exec() {
    local lab=$1; shift
    nsenter -t "$(cat "$lab/pid")" -a -r -w -- env -i PATH="$LAB_PATH" HOME=/root LANG=C.UTF-8 \
        TERM=dumb SYSTEMD_PAGER=cat SYSTEMD_COLORS=0 "$@"
}

lab_start() {
    [ "$(id -u)" = 0 ] || die "must run as root"
    [ -x "$SYSTEMD_BIN" ] || die "systemd is not installed (scripts/setup.sh installs it)"
    [ -c /dev/net/tun ] || die "/dev/net/tun is missing on this machine"
    local cgr; cgr=$(cgroup_root) || die "no cgroup v2 hierarchy at /sys/fs/cgroup or /sys/fs/cgroup/unified"
    grep -qw overlay /proc/filesystems || modprobe overlay 2>/dev/null || die "the kernel has no overlayfs"

    local lab; lab=$(mktemp -d "${LAB_TMPDIR:-/tmp}/simpletun-lab.XXXXXX")
    LAB=$lab
    mkdir "$lab/root" "$lab/rw"
    local d
    : > "$lab/binds"
    for d in "$@"; do
        [ -d "$d" ] && [ "${d#/}" != "$d" ] || die "not an absolute directory: $d"
        printf '%s\n' "$d" >> "$lab/binds"
    done
    local own; own=$(sed -n 's/^0:://p' /proc/self/cgroup); own=${own%/}
    local cg="$cgr$own/${lab##*/}"
    mkdir "$cg"; echo "$cg" > "$lab/cgroup"

    SHELL=/bin/sh setsid -w script -qfec "exec '$SELF' __init '$lab'" "$lab/console.log" \
        </dev/null >/dev/null 2>&1 &
    echo $! > "$lab/launcher.pid"

    local deadline=$(( $(date +%s) + BOOT_TIMEOUT )) pid="" state=""
    while :; do
        [ -z "$pid" ] && [ -s "$lab/pid" ] && pid=$(cat "$lab/pid")
        if [ -n "$pid" ] && [[ "$(readlink "/proc/$pid/exe" 2>/dev/null)" == */systemd ]]; then
            state=$(lab_exec "$lab" systemctl is-system-running 2>/dev/null || true)
            case $state in initializing|starting|running|degraded|maintenance) break ;; esac
        fi
        if ! alive "$(cat "$lab/launcher.pid")" || [ "$(date +%s)" -ge $deadline ]; then
            cat "$lab/console.log" >&2 || true
            lab_stop "$lab"; LAB=""; die "the lab's systemd did not come up"
        fi
        sleep 0.05
    done
    state=$(lab_exec "$lab" timeout "$BOOT_TIMEOUT" systemctl is-system-running --wait 2>/dev/null || true)
    if [ "$state" != running ]; then
        echo "lab.sh: boot state '$state'; failed units:" >&2
        lab_exec "$lab" systemctl --no-pager --no-legend --failed >&2 || true
    fi
}

kill_entered() {
    local pid1=$1 ns p s pp
    ns=$(readlink "/proc/$pid1/ns/pid") || return 0
    for p in /proc/[0-9]*; do
        p=${p#/proc/}
        [ "$p" = "$pid1" ] && continue
        [ "$(readlink "/proc/$p/ns/pid" 2>/dev/null)" = "$ns" ] || continue
        s=$(cat "/proc/$p/stat" 2>/dev/null) || continue
        s=${s##*) }
        # shellcheck disable=SC2086
        set -- $s; pp=$2
        [ "$(readlink "/proc/$pp/ns/pid" 2>/dev/null)" = "$ns" ] && continue
        kill -9 "$p" 2>/dev/null || true; kill -CONT "$pp" 2>/dev/null || true
    done
}

lab_stop() {
    local lab=$1 pid launcher i
    [ -d "$lab" ] || return 0
    [ -f "$lab/cgroup" ] || die "not a lab directory: $lab"
    pid=$(cat "$lab/pid" 2>/dev/null || true)
    launcher=$(cat "$lab/launcher.pid" 2>/dev/null || true)
    if [ -n "$pid" ] && [ -n "$launcher" ] && alive "$pid"; then
        kill_entered "$pid"
        kill -s RTMIN+3 "$pid" 2>/dev/null || true
        for i in $(seq 100); do alive "$launcher" || break; sleep 0.1; done
        alive "$launcher" && kill -9 "$pid" 2>/dev/null || true
    fi
    if [ -n "$launcher" ]; then
        for i in $(seq 50); do alive "$launcher" || break; sleep 0.1; done
        alive "$launcher" && kill -9 "$launcher" 2>/dev/null || true
    fi
    local cg; cg=$(cat "$lab/cgroup")
    for i in $(seq 50); do
        [ -d "$cg" ] || break
        find "$cg" -depth -type d -exec rmdir {} + 2>/dev/null || true
        [ -d "$cg" ] || break; sleep 0.1
    done
    [ -d "$cg" ] && echo "lab.sh: warning: could not remove cgroup $cg" >&2
    if [ "${LAB_KEEP:-0}" = 1 ]; then echo "lab.sh: kept $lab" >&2; else rm -rf --one-file-system "$lab"; fi
}

# ---- inside the new namespaces ----------------------------------------------------------------

stage_init() {
    exec unshare --mount --pid --fork --net --uts --ipc --propagation private -- "$SELF" __pid1 "$1"
}

stage_pid1() {
    local lab=$1 hostpid _
    read -r hostpid _ < /proc/self/stat          # /proc is still the host's: our host PID
    echo "$hostpid" > "$lab/pid"
    echo 0 > "$(cat "$lab/cgroup")/cgroup.procs"
    exec unshare --cgroup -- "$SELF" __root "$lab"
}

stage_root() {
    local lab=$1 R=$1/root console
    console=$(tty 2>/dev/null) || console=""

    mount -t tmpfs -o mode=755 simpletun-lab-rw "$lab/rw"
    mkdir "$lab/rw/upper" "$lab/rw/work"
    mount -t overlay simpletun-lab-root -o "lowerdir=/,upperdir=$lab/rw/upper,workdir=$lab/rw/work" "$R"
    local i=0 mp fstype
    while read -r mp fstype; do
        case $mp in
            /|/proc|/proc/*|/sys|/sys/*|/dev|/dev/*|/run|/run/*|/tmp|/tmp/*|/boot|/boot/*|/mnt/*|/media/*) continue ;;
            "$lab"|"$lab"/*|*\\*) continue ;;
        esac
        case $fstype in proc|sysfs|devtmpfs|devpts|cgroup|cgroup2|mqueue|autofs|nsfs|binfmt_misc|fusectl|securityfs|debugfs|tracefs|bpf|pstore|configfs|hugetlbfs|efivarfs) continue ;; esac
        [ -d "$mp" ] && [ ! -L "$mp" ] || continue
        i=$((i + 1)); mkdir "$lab/rw/upper$i" "$lab/rw/work$i"
        mount -t overlay "simpletun-lab-sub$i" -o "lowerdir=$mp,upperdir=$lab/rw/upper$i,workdir=$lab/rw/work$i" "$R$mp" ||
            echo "lab.sh: warning: could not overlay $mp ($fstype)" >&2
    done < <(awk '{ for (i = 7; $i != "-"; i++); print $5, $(i + 1) }' /proc/self/mountinfo | sort -u -k1,1)

    mount -t proc -o nosuid,nodev,noexec proc "$R/proc"
    mount --bind "$R/proc/sys" "$R/proc/sys"
    mount -o remount,bind,ro,nosuid,nodev,noexec "$R/proc/sys"
    mount --bind "$R/proc/sys/net" "$R/proc/sys/net"
    mount -o remount,bind,rw,nosuid,nodev,noexec "$R/proc/sys/net"
    if [ -e "$R/proc/sysrq-trigger" ]; then
        mount --bind "$R/proc/sysrq-trigger" "$R/proc/sysrq-trigger"
        mount -o remount,bind,ro "$R/proc/sysrq-trigger"
    fi
    mount -t sysfs -o ro,nosuid,nodev,noexec sysfs "$R/sys"
    mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 "$R/sys/fs/cgroup"

    mount -t tmpfs -o mode=755,nosuid simpletun-lab-dev "$R/dev"
    local n
    for n in null zero full random urandom tty net/tun; do
        [ -c "/dev/$n" ] || continue
        mkdir -p "$(dirname "$R/dev/$n")"; touch "$R/dev/$n"; mount --bind "/dev/$n" "$R/dev/$n"
    done
    mkdir "$R/dev/pts" "$R/dev/shm"
    mount -t devpts -o newinstance,ptmxmode=0666,mode=620,gid="$(getent group tty | cut -d: -f3 || echo 5)",nosuid,noexec devpts "$R/dev/pts"
    ln -s pts/ptmx "$R/dev/ptmx"
    mount -t tmpfs -o mode=1777,nosuid,nodev simpletun-lab-shm "$R/dev/shm"
    ln -s /proc/self/fd "$R/dev/fd"
    ln -s /proc/self/fd/0 "$R/dev/stdin"; ln -s /proc/self/fd/1 "$R/dev/stdout"; ln -s /proc/self/fd/2 "$R/dev/stderr"
    touch "$R/dev/console"
    if [ -n "$console" ] && [ -c "$console" ]; then mount --bind "$console" "$R/dev/console"
    else mount --bind /dev/null "$R/dev/console"; fi

    mount -t tmpfs -o mode=755,nosuid,nodev simpletun-lab-run "$R/run"
    mount -t tmpfs -o mode=1777,nosuid,nodev simpletun-lab-tmp "$R/tmp"
    mkdir -p "$R/var/log/journal"               # never write into (a copy-up of) the machine's journal
    mount -t tmpfs -o mode=2755,nosuid,nodev simpletun-lab-journal "$R/var/log/journal"
    chgrp systemd-journal "$R/var/log/journal" 2>/dev/null || true
    local d
    while read -r d; do
        mkdir -p "$R$d"; mount --rbind "$d" "$R$d"; mount -o remount,bind,ro "$R$d"
    done < "$lab/binds"

    tr -d - < /proc/sys/kernel/random/uuid > "$R/etc/machine-id"
    echo simpletun-lab > "$R/etc/hostname"
    mkdir -p "$R/etc/systemd/system-generators"
    ln -sfn /dev/null "$R/etc/systemd/system-generators/systemd-fstab-generator"
    # Units the machine's admin installed must not leak into the test (e.g. an old simpletun@).
    rm -f "$R/etc/systemd/system/simpletun@.service"
    rm -rf "$R/etc/simpletun"
    cat > "$R/etc/systemd/system/simpletun-lab.target" <<'EOF'
[Unit]
Description=simpletun test lab (sysinit + sockets only)
Requires=sysinit.target sockets.target
After=sysinit.target sockets.target
AllowIsolate=yes
EOF

    cd "$R"
    pivot_root . .
    umount -l .
    cd /
    exec setpriv --bounding-set "$DROP_CAPS" -- \
        env -i container=simpletun-lab PATH="$LAB_PATH" \
        "$SYSTEMD_BIN" --unit=simpletun-lab.target --show-status=no
}

case ${1:-} in
    __init) stage_init "$2" ;;
    __pid1) stage_pid1 "$2" ;;
    __root) stage_root "$2" ;;
    start)
        LAB=""
        trap 'rc=$?; trap - EXIT; [ -z "$LAB" ] || lab_stop "$LAB"; exit $rc' EXIT
        shift; lab_start "$@"; echo "$LAB"
        trap - EXIT ;;
    exec)
        [ $# -ge 3 ] || die "usage: lab.sh exec LAB COMMAND [ARG...]"
        shift; lab=$1; shift; [ -s "$lab/pid" ] || die "not a running lab: $lab"
        lab_exec "$lab" "$@" ;;
    stop)
        [ $# -eq 2 ] || die "usage: lab.sh stop LAB"
        lab_stop "$2" ;;
    run)
        [ $# -ge 2 ] || die "usage: lab.sh run COMMAND [ARG...]"
        shift; LAB=""
        trap 'rc=$?; trap - EXIT; [ -z "$LAB" ] || lab_stop "$LAB"; exit $rc' EXIT
        trap 'exit 130' INT
        trap 'exit 143' TERM HUP
        lab_start
        exec 3<&0
        rc=0; lab_exec "$LAB" "$@" <&3 3<&- & wait $! || rc=$?
        exit $rc ;;
    *)
        sed -n '2,/^set -euo/p' "$SELF" | sed '$d; s/^# \{0,1\}//'; exit 2 ;;
esac
