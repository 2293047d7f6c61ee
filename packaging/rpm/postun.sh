# vmesh %postun ($1: 0 = erase, 1 = upgrade): reload unit files; on erase remove the admin token
# %post made and /etc/vmesh if it is then empty. RPM has no purge: the state in /var/lib/vmesh, the logs and the vmesh user stay
# (see docs/install.md to delete them); a locally edited /etc/vmesh/vmesh.toml is kept as
# vmesh.toml.rpmsave.
if [ "$1" -eq 0 ]; then
    rm -f /etc/vmesh/admin.token
    rmdir /etc/vmesh 2>/dev/null || :
fi
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
fi
exit 0
