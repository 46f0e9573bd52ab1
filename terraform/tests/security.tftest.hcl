# The security module on its own: who may reach which port.

mock_provider "aws" {
  source = "./tests/mocks"
}

variables {
  name        = "llm"
  vpc_id      = "vpc-0123456789abcdef0"
  admin_cidrs = ["203.0.113.7/32", "2001:db8:42::/48"]
}

run "ssh_only_from_the_admin_networks" {
  module {
    source = "./modules/security"
  }

  assert {
    condition     = toset(keys(aws_vpc_security_group_ingress_rule.host_ssh)) == toset(["203.0.113.7/32", "2001:db8:42::/48"])
    error_message = "one SSH rule per admin network, and no other"
  }
  assert {
    condition     = aws_vpc_security_group_ingress_rule.host_ssh["2001:db8:42::/48"].cidr_ipv6 == "2001:db8:42::/48" && aws_vpc_security_group_ingress_rule.host_ssh["2001:db8:42::/48"].cidr_ipv4 == null
    error_message = "an IPv6 admin network must land in cidr_ipv6"
  }
  assert {
    # no ingress rule of any kind covers port 22 from the whole internet
    condition = alltrue([
      for r in concat(values(aws_vpc_security_group_ingress_rule.host_ssh), values(aws_vpc_security_group_ingress_rule.host_https), values(aws_vpc_security_group_ingress_rule.host_metrics)) :
      !(r.from_port <= 22 && r.to_port >= 22 && (r.cidr_ipv4 == "0.0.0.0/0" || r.cidr_ipv6 == "::/0"))
    ])
    error_message = "SSH must never be open to 0.0.0.0/0 or ::/0"
  }
}

run "exporters_only_from_the_monitoring_group_and_the_gateway_never" {
  module {
    source = "./modules/security"
  }

  assert {
    condition     = toset([for r in values(aws_vpc_security_group_ingress_rule.host_metrics) : r.from_port]) == toset([9100, 9400, 9180])
    error_message = "node_exporter (9100), dcgm-exporter (9400) and nginx's metrics listener (9180) are the exposed metrics ports"
  }
  assert {
    condition = alltrue([
      for r in values(aws_vpc_security_group_ingress_rule.host_metrics) :
      r.referenced_security_group_id == aws_security_group.monitoring.id && r.cidr_ipv4 == null && r.cidr_ipv6 == null
    ])
    error_message = "metrics ports must be reachable from the monitoring security group only"
  }
  assert {
    # the whole set of ports the hosts accept: SSH, HTTPS, the two exporters and nginx's
    # metrics listener; 8080 (gateway) and 8000+ (vLLM) stay on loopback behind nginx
    condition = toset(flatten([
      [for r in values(aws_vpc_security_group_ingress_rule.host_ssh) : r.from_port],
      [for r in values(aws_vpc_security_group_ingress_rule.host_https) : r.from_port],
      [for r in values(aws_vpc_security_group_ingress_rule.host_metrics) : r.from_port],
    ])) == toset([22, 443, 9100, 9400, 9180])
    error_message = "the hosts must accept 22, 443, 9100, 9400 and 9180 only"
  }
  assert {
    # a Prometheus on one host reaches its peers' listener: the monitoring group may send there
    condition = (
      aws_vpc_security_group_ingress_rule.host_metrics["metrics_listener"].from_port == 9180 &&
      aws_vpc_security_group_egress_rule.monitoring_scrape["metrics_listener"].to_port == 9180 &&
      aws_vpc_security_group_egress_rule.monitoring_scrape["metrics_listener"].referenced_security_group_id == aws_security_group.host.id
    )
    error_message = "the monitoring group must reach nginx's metrics listener (9180) on the hosts, and only there"
  }
  assert {
    condition     = length(aws_security_group.load_balancer) == 0 && length(aws_vpc_security_group_ingress_rule.host_https) == 1
    error_message = "without a load balancer the hosts take HTTPS from api_allowed_cidrs directly"
  }
}

run "behind_a_load_balancer_hosts_take_https_from_it_alone" {
  module {
    source = "./modules/security"
  }

  variables {
    create_load_balancer_group = true
    api_allowed_cidrs          = ["198.51.100.0/24"]
  }

  assert {
    condition     = length(aws_vpc_security_group_ingress_rule.host_https) == 0
    error_message = "behind a load balancer the hosts must not take HTTPS from client networks"
  }
  assert {
    condition     = aws_vpc_security_group_ingress_rule.host_https_from_load_balancer[0].referenced_security_group_id == aws_security_group.load_balancer[0].id
    error_message = "the hosts must take HTTPS (and health checks) from the load balancer's group"
  }
  assert {
    condition     = keys(aws_vpc_security_group_ingress_rule.load_balancer_https) == ["198.51.100.0/24"]
    error_message = "the load balancer must take HTTPS from api_allowed_cidrs"
  }
}
