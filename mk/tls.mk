# Let's Encrypt on a single host: the nginx role installs certbot and its Route53 plugin from the
# distribution's archive; the unit tests parse the role's certbot command line with the same
# packages (tests/unit/test_nginx_letsencrypt.py).
DEB_PACKAGES += certbot python3-certbot-dns-route53
