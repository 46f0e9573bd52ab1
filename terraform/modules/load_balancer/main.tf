locals {
  create_certificate = var.certificate_arn == null
  certificate_arn    = local.create_certificate ? aws_acm_certificate_validation.this[0].certificate_arn : var.certificate_arn
}

resource "aws_lb" "this" {
  #checkov:skip=CKV_AWS_91:access logs need a log bucket with its own policy; the gateway already writes a JSON line per request, enable on the ALB when auditing needs it
  #checkov:skip=CKV2_AWS_28:no WAF: the API authenticates every request with a key and rate-limits per key and per IP at nginx; add a web ACL when the endpoint is a target
  #checkov:skip=CKV_AWS_150:deletion protection is a variable (enable_deletion_protection) so that `make destroy` works on a fresh deployment by default

  name                       = "${var.name}-api"
  load_balancer_type         = "application"
  internal                   = false
  security_groups            = [var.security_group_id]
  subnets                    = var.subnet_ids
  drop_invalid_header_fields = true
  enable_deletion_protection = var.enable_deletion_protection
  # a non-streamed completion sends nothing until it is done; the default 60 s would cut it
  idle_timeout = var.idle_timeout_seconds
}

resource "aws_lb_target_group" "this" {
  name                 = "${var.name}-gw"
  vpc_id               = var.vpc_id
  target_type          = "instance"
  port                 = 443
  protocol             = "HTTPS" # to nginx on each host: traffic stays encrypted inside the VPC
  deregistration_delay = var.deregistration_delay_seconds

  health_check {
    # the gateway's /ready turns 503 while it drains or when no model backend answers, so the
    # load balancer stops sending before a host goes away; it costs no generation
    protocol            = "HTTPS"
    port                = "traffic-port"
    path                = "/ready"
    matcher             = "200"
    interval            = 10
    timeout             = 5
    healthy_threshold   = 2
    unhealthy_threshold = 2
  }
}

resource "aws_lb_target_group_attachment" "this" {
  count = length(var.instance_ids)

  target_group_arn = aws_lb_target_group.this.arn
  target_id        = var.instance_ids[count.index]
  port             = 443
}

resource "aws_lb_listener" "https" {
  load_balancer_arn = aws_lb.this.arn
  port              = 443
  protocol          = "HTTPS"
  ssl_policy        = "ELBSecurityPolicy-TLS13-1-2-2021-06" # TLS 1.2 and 1.3 only
  certificate_arn   = local.certificate_arn

  default_action {
    type             = "forward"
    target_group_arn = aws_lb_target_group.this.arn
  }
}

# ---- certificate, when none is given --------------------------------------------------------

resource "aws_acm_certificate" "this" {
  count = local.create_certificate ? 1 : 0

  domain_name       = var.domain_name
  validation_method = "DNS"

  lifecycle {
    create_before_destroy = true
  }
}

# one name, so one validation record: indexing keeps the count known at plan time
resource "aws_route53_record" "validation" {
  count = local.create_certificate ? 1 : 0

  zone_id         = var.route53_zone_id
  name            = tolist(aws_acm_certificate.this[0].domain_validation_options)[0].resource_record_name
  type            = tolist(aws_acm_certificate.this[0].domain_validation_options)[0].resource_record_type
  records         = [tolist(aws_acm_certificate.this[0].domain_validation_options)[0].resource_record_value]
  ttl             = 300
  allow_overwrite = true
}

resource "aws_acm_certificate_validation" "this" {
  count = local.create_certificate ? 1 : 0

  certificate_arn         = aws_acm_certificate.this[0].arn
  validation_record_fqdns = aws_route53_record.validation[*].fqdn
}
