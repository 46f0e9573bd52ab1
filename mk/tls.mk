# Let's Encrypt on a single host: the nginx role installs certbot and its Route53 plugin from the
# distribution's archive; the unit tests parse the role's certbot command line with the same
# packages (tests/unit/test_nginx_letsencrypt.py), and runs them against pebble, Let's Encrypt's
# ACME test server, and moto's Route53 (tests/integration/test_letsencrypt_dns01.py).
DEB_PACKAGES += certbot python3-certbot-dns-route53 pebble
