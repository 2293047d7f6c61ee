# vmesh %pre ($1: 1 = install, 2 = upgrade): create the vmesh system user before the files
# owned by it are laid down; on upgrade, note that the running agent must be restarted at the
# end of the transaction (%posttrans of the NEW package does it, see posttrans.sh).
getent group vmesh >/dev/null 2>&1 || groupadd -r vmesh
getent passwd vmesh >/dev/null 2>&1 || \
    useradd -r -g vmesh -d /var/lib/vmesh -M -s /sbin/nologin -c "vmesh service-mesh agent" vmesh
if [ "$1" -ge 2 ]; then
    mkdir -p /var/lib/rpm-state/vmesh && touch /var/lib/rpm-state/vmesh/restart
fi
exit 0
