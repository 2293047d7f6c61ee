# vmesh %preun ($1: 0 = erase, 1 = upgrade): on erase, stop (the agent drains) and disable
# vmesh.service and the optional vmesh.socket. On upgrade the agent keeps running.
if [ "$1" -eq 0 ] && [ -d /run/systemd/system ]; then
    systemctl --no-reload disable --now vmesh.socket vmesh.service >/dev/null 2>&1 || :
fi
exit 0
