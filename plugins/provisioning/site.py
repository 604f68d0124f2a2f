"""The TFTP root as sipproxy writes it: from the server's configuration, the users and the provisioned phones.

`Site.write_all` (re)writes every shared file and every phone's; `add_phone` gives the phone's lines
generated passwords (HA1 into the users file, the password into phones.json for SIP<MAC>.cnf) and writes
its files; `remove_phone` deletes them. Shared files are rewritten on every change, so a change to
[plugins.provisioning] reaches the phones with the next `sipproxy-admin phone write`.
"""

import os
import secrets
import string

import attrs

from plugins.provisioning import files
from plugins.provisioning.config import ProvisioningConfig, with_root
from plugins.provisioning.phones import PHONES_FILE, PhoneError, ProvisionedPhone, check_phone, locked_phones, read_phones
from proxy.admin.checksync import SYNCINFO, bump_syncinfo
from proxy.registration.credentials import USERS_FILE, UserRecord, compute_ha1, locked_users, read_users, valid_user_name

_ALPHABET = string.ascii_letters + string.digits


def generated_password(length: int) -> str:
    return "".join(secrets.choice(_ALPHABET) for _ in range(length))


class Site:
    def __init__(self, server_config, config: ProvisioningConfig):
        from proxy.core import identity_from_config

        self.server_config = server_config
        self.config = with_root(config, server_config)
        self.root = self.config.tftp_root
        state_dir = server_config.server.state_dir
        self.phones_path = os.path.join(state_dir, PHONES_FILE)
        self.users_path = os.path.join(server_config.server.shared, USERS_FILE)
        if server_config.checksync.tftp_root and os.path.realpath(server_config.checksync.tftp_root) != \
                os.path.realpath(self.root):
            raise PhoneError(f"[plugins.provisioning] tftp_root ({self.root}) and [checksync] tftp_root "
                             f"({server_config.checksync.tftp_root}) differ: the phones must find syncinfo.xml "
                             "where their TFTP server serves files; set one of them")
        identity = identity_from_config(server_config, quiet=True)
        self.proxy_address = self.config.proxy_address or identity.advertise_host
        self.proxy_port = self.config.proxy_port or identity.port_for("UDP")
        self.web_base = _web_base(server_config.phone_web.listen, identity.advertise_host)

    def phones(self) -> dict[str, ProvisionedPhone]:
        return read_phones(self.phones_path)

    def write_all(self) -> list[str]:
        phones = self.phones()
        written = self._write_shared(phones)
        users = read_users(self.users_path)
        for phone in phones.values():
            written += self._write_phone(phone, users)
        return written

    def _write_shared(self, phones: dict[str, ProvisionedPhone]) -> list[str]:
        c = self.config
        os.makedirs(self.root, exist_ok=True)
        out = []
        out.append(files.write_file(self.root, "SIPDefault.cnf", files.sip_default(
            c, proxy_address=self.proxy_address, proxy_port=self.proxy_port, timers=self.server_config.timers,
            web_base=self.web_base)))
        out.append(files.write_file(self.root, "dialplan.xml", files.dial_plan(
            c.dial_plan, files.emergency_numbers(self.server_config.emergency.patterns))))
        if c.image_version:
            out.append(files.write_file(self.root, "OS79XX.TXT", files.os79xx(c.image_version)))
            loader = files.loader_name(c.image_version)
            out.append(files.write_file(self.root, "XMLDefault.cnf.xml",
                                        files.load_information_xml({"7940": loader, "7960": loader})))
        if not os.path.exists(os.path.join(self.root, SYNCINFO)):
            bump_syncinfo(self.root, set(), write=True)  # creates it with the "*" entry
            out.append(os.path.join(self.root, SYNCINFO))
        return out

    def _write_phone(self, phone: ProvisionedPhone, users: dict[str, UserRecord]) -> list[str]:
        displays = {line: users[line].display_name for line in phone.lines if line in users}
        out = [files.write_file(self.root, f"SIP{phone.mac}.cnf", files.sip_mac(phone, displays))]
        image = phone.image or self.config.image_version
        if image:
            out.append(files.write_file(self.root, f"SEP{phone.mac}.cnf.xml",
                                        files.load_information_xml({phone.model: image})))
        return out

    def add_phone(self, device: str, model: str, lines: tuple[str, ...], label: str = "",
                  replace: bool = False) -> tuple[ProvisionedPhone, list[str]]:
        """Provision a phone; returns it and the users whose password was (re)set for it."""
        for line in lines:
            if not valid_user_name(line):
                raise PhoneError(f"{line!r} cannot be a line (user) name")
        reset = []
        realm = self.server_config.realm
        with locked_phones(self.phones_path) as phones:
            old = phones.get(device)
            if old is not None and not replace:
                raise PhoneError(f"{device} is provisioned already (phone show {device}; phone remove, or --replace)")
            for other in phones.values():
                shared = set(other.lines) & set(lines)
                if other.device != device and shared:
                    raise PhoneError(f"line {', '.join(sorted(shared))} is on {other.device} already")
            known = {line: pw for p in phones.values() for line, pw in p.passwords.items()}
            passwords = {}
            with locked_users(self.users_path) as users:
                for line in lines:
                    password = known.get(line)
                    if password is None or line not in users or users[line].ha1 != compute_ha1(line, realm, password):
                        password = generated_password(self.config.password_length)
                        reset.append(line)
                    passwords[line] = password
                    ha1 = compute_ha1(line, realm, password)
                    users[line] = attrs.evolve(users[line], realm=realm, ha1=ha1) if line in users else \
                        UserRecord(name=line, realm=realm, ha1=ha1)
            phone = ProvisionedPhone(device=device, model=model, lines=tuple(lines), label=label,
                                     image=old.image if old else "", passwords=passwords)
            check_phone(phone)
            phones[device] = phone
        self.write_all()
        return phone, reset

    def remove_phone(self, device: str) -> ProvisionedPhone:
        with locked_phones(self.phones_path) as phones:
            phone = phones.pop(device, None)
            if phone is None:
                raise PhoneError(f"{device} is not provisioned")
        files.remove_file(self.root, f"SIP{phone.mac}.cnf")
        files.remove_file(self.root, f"SEP{phone.mac}.cnf.xml")
        return phone

    def set_image(self, device: str, image: str) -> ProvisionedPhone:
        """This phone's own image_version (an upgrade step), in its SIP<MAC>.cnf only."""
        with locked_phones(self.phones_path) as phones:
            if device not in phones:
                raise PhoneError(f"{device} is not provisioned")
            phones[device] = phone = attrs.evolve(phones[device], image=image)
        self._write_phone(phone, read_users(self.users_path))
        return phone


def _web_base(listen: str, host: str) -> str:
    parts = listen.split(":")
    if parts[0] not in ("tcp", "tcp6") or len(parts) < 2 or not parts[1].isdigit():
        return ""
    interface = next((p.split("=", 1)[1] for p in parts[2:] if p.startswith("interface=")), "")
    shown = interface if interface and interface not in ("0.0.0.0", "::") else host
    return f"http://{shown}:{parts[1]}"
