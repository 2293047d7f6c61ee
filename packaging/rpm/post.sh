# vmesh %post ($1: 1 = install, 2 = upgrade): the state and log directories, owned by the vmesh
# user (%pre created it); with systemd running, reload unit files and enable (not start)
# vmesh.service on first install. Without systemd (chroot, container, image build) no
# systemctl is called. Idempotent.
for dir in /var/lib/vmesh /var/log/vmesh; do
    install -d -o vmesh -g vmesh -m 0750 "$dir"
done
# The admin API token (every call that changes something must present it): made once, readable
# by root and the vmesh group only; an existing one is kept.
if [ ! -e /etc/vmesh/admin.token ]; then
    (umask 077; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > /etc/vmesh/admin.token; echo >> /etc/vmesh/admin.token)
fi
chown root:vmesh /etc/vmesh/admin.token
chmod 0640 /etc/vmesh/admin.token
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
    if [ "$1" -eq 1 ]; then
        systemctl enable vmesh.service >/dev/null 2>&1 || :
    fi
fi
exit 0
