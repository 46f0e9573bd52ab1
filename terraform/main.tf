provider "aws" {
  region = var.region

  default_tags {
    tags = merge(var.tags, {
      Project   = var.name
      ManagedBy = "terraform"
    })
  }
}

locals {
  # more than one host: clients need one address, and /ready health checks take a host out
  create_load_balancer = var.host_count > 1
  # keys managed once for the deployment: several hosts must serve the same keys, and a
  # replaced host every key from its first request
  create_key_store = var.create_key_store || local.create_load_balancer
  # the two first regular zones that offer the instance type (not every zone has every GPU
  # type); Local and Wavelength Zones may offer it too, but lack services the stack uses
  gpu_zones          = sort(setintersection(data.aws_ec2_instance_type_offerings.gpu.locations, data.aws_availability_zones.regular.names))
  availability_zones = slice(local.gpu_zones, 0, 2)
  # one host with a name: nginx gets a Let's Encrypt certificate by DNS-01 in the Route53 zone
  # (variables.tf refuses a single host with domain_name but no zone or e-mail)
  letsencrypt = !local.create_load_balancer && var.domain_name != null && var.route53_zone_id != null
  # what the endpoint's certificate is: ACM on the load balancer, Let's Encrypt on one named
  # host, else the host's self-signed one
  api_tls = local.create_load_balancer ? "acm" : local.letsencrypt ? "letsencrypt" : "self-signed"
  # several gateways must count one budget per key in one place, not one budget per host
  create_cache = var.host_count > 1 || var.enable_shared_cache
}

# The region's own availability zones: no Local Zones (us-east-1-bos-1a ...) or Wavelength Zones,
# which are opt-in and would otherwise sort first
data "aws_availability_zones" "regular" {
  #checkov:skip=CKV_AWS_394:only narrows the offerings to regular zones; the network takes the first two by name, and a zone AWS adds gets a later letter, so the choice does not move
  state = "available"

  filter {
    name   = "opt-in-status"
    values = ["opt-in-not-required"]
  }

  filter {
    name   = "zone-type"
    values = ["availability-zone"]
  }

  lifecycle {
    postcondition {
      condition     = length(setintersection(self.names, data.aws_ec2_instance_type_offerings.gpu.locations)) >= 2
      error_message = "Region ${var.region} offers ${var.instance_type} in fewer than two of its regular availability zones (Local and Wavelength Zones do not count); two are needed. Choose a region that has it in two or more zones, such as us-east-1, us-west-2 or eu-west-1."
    }
  }
}

data "aws_ec2_instance_type_offerings" "gpu" {
  location_type = "availability-zone"

  filter {
    name   = "instance-type"
    values = [var.instance_type]
  }

  lifecycle {
    postcondition {
      condition     = length(self.locations) >= 2
      error_message = "Region ${var.region} offers ${var.instance_type} in ${length(self.locations)} availability zone(s); two are needed. Choose a region that has it in two or more zones, such as us-east-1, us-west-2 or eu-west-1."
    }
  }
}

module "network" {
  source = "./modules/network"

  name               = var.name
  vpc_cidr           = var.vpc_cidr
  availability_zones = local.availability_zones
  enable_flow_logs   = var.enable_flow_logs
  # the shared cache lives in private subnets; without it the VPC keeps its public pair only
  create_private_subnets = local.create_cache
}

module "security" {
  source = "./modules/security"

  name                       = var.name
  vpc_id                     = module.network.vpc_id
  admin_cidrs                = var.admin_cidrs
  api_allowed_cidrs          = var.api_allowed_cidrs
  metrics_ports              = var.metrics_ports
  create_load_balancer_group = local.create_load_balancer
}

module "model_bucket" {
  source = "./modules/model_bucket"
  count  = var.create_model_bucket ? 1 : 0

  name = var.name
}

# The hashed key set in one S3 object; the hosts' role may read that object and nothing else
# of it. Operators change it with `make key-create|key-rotate|key-revoke`.
module "key_store" {
  source = "./modules/key_store"
  count  = local.create_key_store ? 1 : 0

  name           = var.name
  region         = var.region
  host_role_name = module.gpu_host.iam_role_name
}

module "gpu_host" {
  source = "./modules/gpu_host"

  name                  = var.name
  host_count            = var.host_count
  instance_type         = var.instance_type
  ami_flavor            = var.ami_flavor
  ami_id                = var.ami_id
  ssh_public_key        = var.ssh_public_key
  subnets               = module.network.public_subnets
  root_volume_size_gb   = var.root_volume_size_gb
  models_volume_size_gb = var.models_volume_size_gb
  detailed_monitoring   = var.enable_detailed_monitoring
  # the hosts carry the monitoring group too: a Prometheus on one of them scrapes its peers
  security_group_ids         = [module.security.host_security_group_id, module.security.monitoring_security_group_id]
  enable_model_bucket_access = var.create_model_bucket
  model_bucket_arn           = var.create_model_bucket ? module.model_bucket[0].arn : null
  # Route53 permissions for certbot's DNS-01 challenge, on a single named host only
  letsencrypt_domain  = local.letsencrypt ? var.domain_name : null
  letsencrypt_zone_id = local.letsencrypt ? var.route53_zone_id : null
}

module "load_balancer" {
  source = "./modules/load_balancer"
  count  = local.create_load_balancer ? 1 : 0

  name                       = var.name
  vpc_id                     = module.network.vpc_id
  subnet_ids                 = module.network.public_subnet_ids
  security_group_id          = module.security.load_balancer_security_group_id
  instance_ids               = module.gpu_host.instance_ids
  domain_name                = var.domain_name
  certificate_arn            = var.certificate_arn
  route53_zone_id            = var.route53_zone_id
  enable_deletion_protection = var.enable_deletion_protection
}

module "dns" {
  source = "./modules/dns"
  count  = var.route53_zone_id != null ? 1 : 0

  zone_id       = var.route53_zone_id
  record_name   = var.domain_name
  use_alias     = local.create_load_balancer
  alias_name    = local.create_load_balancer ? module.load_balancer[0].dns_name : null
  alias_zone_id = local.create_load_balancer ? module.load_balancer[0].zone_id : null
  addresses     = local.create_load_balancer ? [] : module.gpu_host.hosts[*].public_ip
}

# The topic the hosts' Alertmanager publishes alerts to, with the hosts' role allowed to
# publish there and nowhere else.
module "alerts" {
  source = "./modules/alerts"

  name           = var.name
  region         = var.region
  host_role_name = module.gpu_host.iam_role_name
  alert_email    = var.alert_email
  kms_key_arn    = var.alert_topic_kms_key_arn
  # only for the `email` receiver's relay
  host_security_group_id = module.security.host_security_group_id
  smtp_port              = var.alert_smtp_port
}

# One budget per key across the hosts: the gateways' rate-limit counters in ElastiCache for
# Valkey, reachable from the hosts only, its AUTH token in SSM for the hosts' role to read.
module "cache" {
  source = "./modules/cache"
  count  = local.create_cache ? 1 : 0

  name                   = var.name
  region                 = var.region
  vpc_id                 = module.network.vpc_id
  subnet_ids             = module.network.private_subnet_ids
  host_security_group_id = module.security.host_security_group_id
  host_role_name         = module.gpu_host.iam_role_name
  node_type              = var.cache_node_type
  node_count             = var.cache_node_count
}
