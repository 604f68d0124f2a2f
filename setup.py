from setuptools import find_packages, setup

setup(
    name="sipproxy",
    version="0.1.0",
    description="SIP proxy, registrar and redirect server for Cisco 7940/7960 SIP phones",
    python_requires=">=3.11",
    packages=find_packages(include=["proxy", "proxy.*", "plugins", "plugins.*"]) + ["twisted.plugins"],
    install_requires=[
        "twisted>=24.7,<27",
        "attrs>=23.1",
        "zope.interface>=6.0",
        "service-identity>=24.1",
        "pyOpenSSL>=24.0",
        "ldap3>=2.9,<3",
        "prometheus-client>=0.20,<1",
        "tzdata>=2024.1",  # the policy plugin's office hours: zone rules even where the host has none
    ],
    extras_require={
        # sipvicious: the scanner attackers use (tests/integration/test_policy_sipp.py); tftpy: a TFTP client
        # for the provisioning plugin's server (tests/integration/test_provisioning_tftp.py)
        "test": ["pytest>=8", "hypothesis>=6.100", "sipvicious>=0.3.4", "tftpy>=0.8"],
    },
    entry_points={"console_scripts": ["sipproxy-admin = proxy.admin.cli:main"]},
    data_files=[("share/sipproxy/etc", ["etc/sipproxy.toml", "etc/sipproxy.service", "etc/prometheus.yml"]),
                ("share/sipproxy/docs", ["docs/deploy.md"])],
)
