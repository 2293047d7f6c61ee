# vmesh %post ($1: 1 = install, 2 = upgrade): the state and log directories, owned by the vmesh
# user (%pre created it); with systemd running, reload unit files and enable (not start)
# vmesh.service on first install. Without systemd (chroot, container, image build) no
# systemctl is called. Idempotent.
for dir in /var/lib/vmesh /var/log/vmesh; do
    install -d -o vmesh -g vmesh -m 0750 "$dir"
done
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
    if [ "$1" -eq 1 ]; then
        systemctl enable vmesh.service >/dev/null 2>&1 || :
    fi
fi
exit 0
