# The load_balancer module on its own: HTTPS all the way, health checks on the gateway's /ready.

mock_provider "aws" {
  source = "./tests/mocks"
}

variables {
  name              = "llm"
  vpc_id            = "vpc-0123456789abcdef0"
  subnet_ids        = ["subnet-0aaaaaaaaaaaaaaaa", "subnet-0bbbbbbbbbbbbbbbb"]
  security_group_id = "sg-0123456789abcdef0"
  instance_ids      = ["i-00000000000000001", "i-00000000000000002", "i-00000000000000003"]
  domain_name       = "api.example.com"
  route53_zone_id   = "Z0123456789ABCDEFGHIJ"
}

run "health_checks_hit_ready_over_https_443" {
  module {
    source = "./modules/load_balancer"
  }

  assert {
    condition = (
      aws_lb_target_group.this.protocol == "HTTPS" && aws_lb_target_group.this.port == 443 &&
      aws_lb_target_group.this.health_check[0].protocol == "HTTPS" &&
      aws_lb_target_group.this.health_check[0].path == "/ready" &&
      aws_lb_target_group.this.health_check[0].port == "traffic-port" &&
      aws_lb_target_group.this.health_check[0].matcher == "200"
    )
    error_message = "the target group must reach nginx on 443 over HTTPS and check the gateway's /ready"
  }
  assert {
    condition     = tolist(aws_lb_target_group_attachment.this[*].target_id) == var.instance_ids && alltrue([for a in aws_lb_target_group_attachment.this : a.port == 443])
    error_message = "every host must be registered on 443"
  }
  assert {
    condition     = aws_lb_listener.https.protocol == "HTTPS" && aws_lb_listener.https.port == 443 && startswith(aws_lb_listener.https.ssl_policy, "ELBSecurityPolicy-TLS13-1-2")
    error_message = "the listener must be HTTPS on 443 with TLS 1.2+ only"
  }
  assert {
    condition     = aws_lb.this.drop_invalid_header_fields && !aws_lb.this.internal && aws_lb.this.idle_timeout >= 120
    error_message = "public ALB, invalid headers dropped, idle timeout long enough for a non-streamed completion"
  }
  assert {
    condition     = length(aws_acm_certificate.this) == 1 && aws_acm_certificate.this[0].domain_name == "api.example.com" && aws_route53_record.validation[0].zone_id == var.route53_zone_id
    error_message = "without certificate_arn a DNS-validated certificate for domain_name is requested"
  }
}

run "an_existing_certificate_is_used_as_given" {
  command = plan

  module {
    source = "./modules/load_balancer"
  }

  variables {
    route53_zone_id = null
    certificate_arn = "arn:aws:acm:us-east-1:123456789012:certificate/0b1c2d3e-aaaa-bbbb-cccc-000000000009"
  }

  assert {
    condition     = length(aws_acm_certificate.this) == 0 && aws_lb_listener.https.certificate_arn == var.certificate_arn
    error_message = "certificate_arn must be served as is, with nothing requested"
  }
}
