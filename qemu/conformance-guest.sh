# Run inside a guest by qemu/conformance.sh (busybox sh; the share is /mnt, the tools are in
# /mnt/.conformance/). Runs pjdfstest on a directory of the share, then fsx on a file of it,
# and prints the results between markers the host script parses:
#   PJDFSTEST-BEGIN ... PJDFSTEST-END   pjdfstest's own lines ("<test> ok|FAILED|skipped"), a
#                                       failure's message on the tab-indented line after it
#   PJDFSTEST-RERUN <test> ok|FAILED    each failed case run twice more on its own, so that the
#                                       host tells a case that fails every time from one that
#                                       failed once (its message is kept either way)
#   FSX-EXIT=<status>                   fsx's exit status (0: every read matched)
# The guest's exit status is 0 when both ran; the verdict is the host script's.
set -u
tools=/tmp/conformance
mkdir -p "$tools"
cp /mnt/.conformance/pjdfstest /mnt/.conformance/fsx /mnt/.conformance/sleep \
   /mnt/.conformance/pjdfstest.toml /mnt/.conformance/fsx.toml "$tools"/ || exit 2
chmod 755 "$tools/pjdfstest" "$tools/fsx" "$tools/sleep"
# pjdfstest's ETXTBSY cases copy and run `which sleep`: a real static program, not a busybox
# applet link (busybox run under another name is no applet).
PATH="$tools:$PATH"
export PATH NO_COLOR=1

# The users and groups pjdfstest switches to (its default dummy_auth entries).
cat > /etc/passwd <<'EOF'
root:x:0:0:root:/root:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
tests:x:1000:1000:tests:/nonexistent:/bin/false
pjdfstest:x:1001:1001:pjdfstest:/nonexistent:/bin/false
EOF
cat > /etc/group <<'EOF'
root:x:0:
nogroup:x:65534:
tests:x:1000:tests
pjdfstest:x:1001:pjdfstest
EOF

mkdir -p /mnt/pjd /tmp/pjd-secondary
echo "conformance: pjdfstest 0.2.2 in /mnt/pjd (second filesystem for EXDEV: /tmp)"
echo PJDFSTEST-BEGIN
"$tools/pjdfstest" -c "$tools/pjdfstest.toml" -p /mnt/pjd -s /tmp/pjd-secondary 2>&1 \
    | sed 's/\x1b\[[0-9;]*m//g' | tee /tmp/pjd.log
echo PJDFSTEST-END
for case in $(awk '$NF == "FAILED" { print $1 }' /tmp/pjd.log); do
    for _ in 1 2; do
        "$tools/pjdfstest" -c "$tools/pjdfstest.toml" -p /mnt/pjd -s /tmp/pjd-secondary -e "pjdfstest::tests::$case" \
            2>&1 | sed 's/\x1b\[[0-9;]*m//g' > /tmp/pjd-rerun.log
        if grep -q "^$case  *ok\$" /tmp/pjd-rerun.log; then
            echo "PJDFSTEST-RERUN $case ok"
        else
            echo "PJDFSTEST-RERUN $case FAILED"
            grep -A3 "FAILED\$" /tmp/pjd-rerun.log
        fi
    done
done
cd / || exit 2

seed=${1:-20261206}
ops=${2:-20000}
echo "conformance: fsx, $ops operations, seed $seed, on /mnt/fsx.file"
"$tools/fsx" -f "$tools/fsx.toml" -N "$ops" -S "$seed" /mnt/fsx.file > /tmp/fsx.log 2>&1
status=$?
tail -n 40 /tmp/fsx.log
echo "FSX-EXIT=$status"
exit 0
