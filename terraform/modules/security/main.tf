# One rule per CIDR: a security group rule holds either one IPv4 or one IPv6 range.
locals {
  admin_cidrs = toset(var.admin_cidrs)
  api_cidrs   = toset(var.api_allowed_cidrs)
}

# ---- GPU hosts -----------------------------------------------------------------------------

resource "aws_security_group" "host" {
  #checkov:skip=CKV2_AWS_5:attached to the GPU instances by the root module (module.gpu_host); checkov does not follow module outputs
  name_prefix = "${var.name}-gpu-host-"
  description = "GPU hosts: HTTPS to nginx, SSH from admins, exporters from monitoring"
  vpc_id      = var.vpc_id

  tags = { Name = "${var.name}-gpu-host" }

  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_vpc_security_group_ingress_rule" "host_ssh" {
  for_each = local.admin_cidrs

  security_group_id = aws_security_group.host.id
  description       = "SSH from an admin network"
  ip_protocol       = "tcp"
  from_port         = 22
  to_port           = 22
  cidr_ipv4         = strcontains(each.value, ":") ? null : each.value
  cidr_ipv6         = strcontains(each.value, ":") ? each.value : null
}

resource "aws_vpc_security_group_ingress_rule" "host_https" {
  for_each = var.create_load_balancer_group ? toset([]) : local.api_cidrs

  security_group_id = aws_security_group.host.id
  description       = "HTTPS API (nginx) from allowed clients"
  ip_protocol       = "tcp"
  from_port         = 443
  to_port           = 443
  cidr_ipv4         = strcontains(each.value, ":") ? null : each.value
  cidr_ipv6         = strcontains(each.value, ":") ? each.value : null
}

resource "aws_vpc_security_group_ingress_rule" "host_https_from_load_balancer" {
  count = var.create_load_balancer_group ? 1 : 0

  security_group_id            = aws_security_group.host.id
  description                  = "HTTPS API and /ready health checks from the load balancer"
  ip_protocol                  = "tcp"
  from_port                    = 443
  to_port                      = 443
  referenced_security_group_id = aws_security_group.load_balancer[0].id
}

resource "aws_vpc_security_group_ingress_rule" "host_metrics" {
  for_each = var.metrics_ports

  security_group_id            = aws_security_group.host.id
  description                  = "${each.key} scraped from the monitoring group"
  ip_protocol                  = "tcp"
  from_port                    = each.value
  to_port                      = each.value
  referenced_security_group_id = aws_security_group.monitoring.id
}

# Hosts fetch OS packages (apt over HTTP and HTTPS), NVIDIA's repositories, Python wheels and
# model weights; those mirrors and CDNs have no fixed addresses, so egress is by port only.
resource "aws_vpc_security_group_egress_rule" "host_web" {
  for_each = { http = 80, https = 443 }

  security_group_id = aws_security_group.host.id
  description       = "Outbound ${upper(each.key)} for packages and model downloads"
  ip_protocol       = "tcp"
  from_port         = each.value
  to_port           = each.value
  cidr_ipv4         = "0.0.0.0/0"
}

# ---- monitoring ----------------------------------------------------------------------------

# Membership grants scraping rights. The GPU hosts are members too, so a Prometheus on one of
# them reaches its peers; a separate monitoring host joins by carrying this group.
resource "aws_security_group" "monitoring" {
  #checkov:skip=CKV2_AWS_5:attached to the GPU instances by the root module (module.gpu_host) and to any monitoring host; checkov does not follow module outputs
  name_prefix = "${var.name}-monitoring-"
  description = "Members may scrape the GPU hosts' exporter ports"
  vpc_id      = var.vpc_id

  tags = { Name = "${var.name}-monitoring" }

  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_vpc_security_group_egress_rule" "monitoring_scrape" {
  for_each = var.metrics_ports

  security_group_id            = aws_security_group.monitoring.id
  description                  = "Scrape ${each.key} on the GPU hosts"
  ip_protocol                  = "tcp"
  from_port                    = each.value
  to_port                      = each.value
  referenced_security_group_id = aws_security_group.host.id
}

# ---- load balancer -------------------------------------------------------------------------

resource "aws_security_group" "load_balancer" {
  count = var.create_load_balancer_group ? 1 : 0
  #checkov:skip=CKV2_AWS_5:attached to the ALB by the root module (module.load_balancer); checkov does not follow module outputs

  name_prefix = "${var.name}-alb-"
  description = "API load balancer: HTTPS from allowed clients, HTTPS to the GPU hosts"
  vpc_id      = var.vpc_id

  tags = { Name = "${var.name}-alb" }

  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_vpc_security_group_ingress_rule" "load_balancer_https" {
  for_each = var.create_load_balancer_group ? local.api_cidrs : toset([])

  security_group_id = aws_security_group.load_balancer[0].id
  description       = "HTTPS API from allowed clients"
  ip_protocol       = "tcp"
  from_port         = 443
  to_port           = 443
  cidr_ipv4         = strcontains(each.value, ":") ? null : each.value
  cidr_ipv6         = strcontains(each.value, ":") ? each.value : null
}

resource "aws_vpc_security_group_egress_rule" "load_balancer_to_hosts" {
  count = var.create_load_balancer_group ? 1 : 0

  security_group_id            = aws_security_group.load_balancer[0].id
  description                  = "HTTPS to the GPU hosts' nginx"
  ip_protocol                  = "tcp"
  from_port                    = 443
  to_port                      = 443
  referenced_security_group_id = aws_security_group.host.id
}
