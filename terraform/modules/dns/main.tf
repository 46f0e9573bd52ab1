resource "aws_route53_record" "alias" {
  count = var.use_alias ? 1 : 0

  zone_id = var.zone_id
  name    = var.record_name
  type    = "A"

  alias {
    name                   = var.alias_name
    zone_id                = var.alias_zone_id
    evaluate_target_health = true
  }
}

resource "aws_route53_record" "address" {
  count = var.use_alias ? 0 : 1
  #checkov:skip=CKV2_AWS_23:the addresses are the hosts' Elastic IPs, passed in by the root module; checkov cannot see that across modules

  zone_id = var.zone_id
  name    = var.record_name
  type    = "A"
  ttl     = var.ttl_seconds
  records = var.addresses
}
