from twisted.application.service import ServiceMaker

sipProxy = ServiceMaker("SIP proxy", "proxy.tap", "SIP proxy, registrar and redirect server for Cisco 7940/7960 phones", "sipproxy")
