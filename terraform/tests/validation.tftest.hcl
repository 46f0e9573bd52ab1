# Bad inputs are refused at plan time by the variables' validation rules, before anything is
# created. (tests/infra/test_terraform.py also checks the messages users see.)

mock_provider "aws" {
  source = "./tests/mocks"
}

variables {
  admin_cidrs    = ["203.0.113.7/32"]
  ssh_public_key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJq7eXAMPLEkEyFoRtEsTsOnLy test@example"
}

run "ssh_open_to_the_world_is_refused" {
  command = plan
  variables {
    admin_cidrs = ["203.0.113.7/32", "0.0.0.0/0"]
  }
  expect_failures = [var.admin_cidrs]
}

run "ssh_open_to_the_ipv6_world_is_refused" {
  command = plan
  variables {
    admin_cidrs = ["::/0"]
  }
  expect_failures = [var.admin_cidrs]
}

run "ssh_from_a_range_wider_than_slash_8_is_refused" {
  command = plan
  variables {
    admin_cidrs = ["0.0.0.0/1", "128.0.0.0/1"]
  }
  expect_failures = [var.admin_cidrs]
}

run "no_admin_network_is_refused" {
  command = plan
  variables {
    admin_cidrs = []
  }
  expect_failures = [var.admin_cidrs]
}

run "an_admin_network_that_is_not_a_cidr_is_refused" {
  command = plan
  variables {
    admin_cidrs = ["my-laptop"]
  }
  expect_failures = [var.admin_cidrs]
}

run "a_non_gpu_instance_type_is_refused" {
  command = plan
  variables {
    instance_type = "t3.large"
  }
  expect_failures = [var.instance_type]
}

run "an_arm_gpu_instance_type_is_refused" {
  command = plan
  variables {
    instance_type = "g5g.xlarge"
  }
  expect_failures = [var.instance_type]
}

run "zero_hosts_are_refused" {
  command = plan
  variables {
    host_count = 0
  }
  expect_failures = [var.host_count]
}

run "more_than_ten_hosts_are_refused" {
  command = plan
  variables {
    host_count = 11
  }
  expect_failures = [var.host_count]
}

run "several_hosts_without_a_certificate_name_are_refused" {
  command = plan
  variables {
    host_count = 3
  }
  expect_failures = [var.host_count]
}

run "a_zone_without_a_domain_is_refused" {
  command = plan
  variables {
    route53_zone_id = "Z0123456789ABCDEFGHIJ"
  }
  expect_failures = [var.route53_zone_id]
}

run "a_malformed_public_key_is_refused" {
  command = plan
  variables {
    ssh_public_key = "~/.ssh/id_ed25519.pub"
  }
  expect_failures = [var.ssh_public_key]
}

run "exposing_the_gateway_port_as_metrics_is_refused" {
  command = plan
  variables {
    metrics_ports = { gateway = 8080 }
  }
  expect_failures = [var.metrics_ports]
}

run "a_malformed_region_is_refused" {
  command = plan
  variables {
    region = "virginia"
  }
  expect_failures = [var.region]
}

run "a_name_unfit_for_aws_resource_names_is_refused" {
  command = plan
  variables {
    name = "LLM_prod"
  }
  expect_failures = [var.name]
}

run "overriding_the_tags_the_tools_search_by_is_refused" {
  command = plan
  variables {
    tags = { Project = "other" }
  }
  expect_failures = [var.tags]
}

run "root_volume_too_small_for_cuda_is_refused" {
  command = plan
  variables {
    root_volume_size_gb = 8
  }
  expect_failures = [var.root_volume_size_gb]
}

run "a_region_without_the_gpu_type_in_two_zones_is_refused" {
  command = plan
  override_data {
    target = data.aws_ec2_instance_type_offerings.gpu
    values = { locations = ["af-south-1a"] }
  }
  expect_failures = [data.aws_ec2_instance_type_offerings.gpu]
}

run "gpu_type_only_in_local_zones_besides_one_regular_zone_is_refused" {
  command = plan
  override_data {
    target = data.aws_ec2_instance_type_offerings.gpu
    values = { locations = ["us-east-1-bos-1a", "us-east-1-mia-1a", "us-east-1a"] }
  }
  override_data {
    target = data.aws_availability_zones.regular
    values = { names = ["us-east-1a", "us-east-1b"] }
  }
  expect_failures = [data.aws_availability_zones.regular]
}

run "ubuntu_2204_images_are_refused" {
  command = plan
  variables {
    ami_flavor = "ubuntu-22.04"
  }
  expect_failures = [var.ami_flavor]
}

run "deep_learning_ami_on_ubuntu_2204_is_refused" {
  command = plan
  variables {
    ami_flavor = "dlami-ubuntu-22.04"
  }
  expect_failures = [var.ami_flavor]
}

run "a_named_single_host_without_a_zone_is_refused" {
  # Let's Encrypt by DNS-01 needs the zone; without it the name would promise a trusted
  # certificate nginx cannot get (port 80 is closed)
  command = plan
  variables {
    domain_name       = "api.example.com"
    letsencrypt_email = "ops@example.com"
  }
  expect_failures = [var.letsencrypt_email]
}

run "a_named_single_host_without_an_acme_email_is_refused" {
  command = plan
  variables {
    domain_name     = "api.example.com"
    route53_zone_id = "Z0123456789ABCDEFGHIJ"
  }
  expect_failures = [var.letsencrypt_email]
}

run "a_malformed_acme_email_is_refused" {
  command = plan
  variables {
    domain_name       = "api.example.com"
    route53_zone_id   = "Z0123456789ABCDEFGHIJ"
    letsencrypt_email = "ops at example.com"
  }
  expect_failures = [var.letsencrypt_email]
}
